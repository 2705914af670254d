"""benchmarks/latency_backends.py on a CUDA GPU (eager, torch.compile, CUDA events; batch 1 and
128), runnable where only torch is installed: the packages depthcut's data side imports (numpy,
Pillow, tqdm) are stood in for while depthcut is imported when they are missing (nothing timed
here touches data) and taken out again before anything runs, so that torch's own optional
imports still see them missing; onnxruntime is not asked for. Refuses without a GPU unless
given `--device cpu` (a dry run).

    PYTHONPATH=. python3 scripts/gpu_latency.py [--time-limit 230] [latency_backends options]
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STOOD_IN = ("numpy", "PIL", "tqdm")  # imported at depthcut's import, never used by the timing


class _Missing:
    """What a stood-in package hands out: fails when used, names the package."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> _Missing:
        return _Missing(f"{self._name}.{attribute}")

    def __call__(self, *args: object, **kwargs: object) -> object:
        raise ImportError(f"{self._name} is not installed here (stood in by gpu_latency.py)")


def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def stand_in_missing(names: tuple[str, ...] = STOOD_IN) -> list[str]:
    """A placeholder module in sys.modules for each of `names` that cannot be imported (and
    the submodules depthcut imports from them); returns the sys.modules keys added."""
    added = []
    for name in (name for name in names if not importable(name)):
        module = types.ModuleType(name)
        module.__getattr__ = lambda attribute, name=name: _Missing(f"{name}.{attribute}")
        module.__path__ = []  # a package: `from PIL import Image` and the like resolve
        for key in (name, f"{name}.Image", f"{name}.auto", f"{name}.random"):
            if key not in sys.modules:
                sys.modules[key] = module
                added.append(key)
    return added


def main(argv: list[str]) -> int:
    import torch

    if not torch.cuda.is_available() and "cpu" not in argv:
        print(f"no CUDA GPU visible to torch {torch.__version__}; give --device cpu for a dry "
              "run", file=sys.stderr)
        return 2
    added = stand_in_missing()
    if added:
        print(f"stood in for {', '.join(added)} (not installed)", file=sys.stderr)
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(
        "latency_backends", ROOT / "benchmarks" / "latency_backends.py")
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(benchmark)  # imports depthcut
    finally:
        for key in added:
            del sys.modules[key]
    benchmark.main(["--device", "cuda", "--rounds", "15", "--time-limit", "230", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
