"""The "onnxruntime" timer: the module exported to ONNX once and run by ONNX Runtime's CPU
execution provider on torch's thread count, the runtime many users deploy to. PyTorch eager is a
poor stand-in for it (its slow depthwise convolutions inflate what collapsing a block saves), so
latency-aware choices and tables can be taken here instead.

The export is checked against PyTorch on the example before anything is timed: a wrong export
would time another function. Needs the optional packages (`pip install 'depthcut[onnx]'`); the
timer is registered without them and refuses when used, so `--latency-backend` always lists it.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from depthcut import export
from depthcut.cost.timer import Timer, register_timer
from depthcut.errors import ConfigError

INSTALL = "pip install 'depthcut[onnx]'"
# |ONNX - PyTorch| allowed, relative to the output's scale: ONNX Runtime fuses and reorders
# float32 arithmetic, but a wrong export is off by far more.
CHECK_TOLERANCE = 1e-3


def onnxruntime_module() -> ModuleType:
    """onnxruntime, after checking that the exporter's packages are there too; ConfigError
    naming the extra to install otherwise."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"the onnxruntime latency backend needs onnxruntime, onnx and onnxscript ({error}); "
            f"install them with: {INSTALL}, or choose another --latency-backend") from error
    return onnxruntime


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's log warnings (operators of packages not installed) held back: they are
    about the exporter, not the model timed."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class OnnxRuntimeTimer(Timer):
    name = "onnxruntime"

    def session_options(self, onnxruntime: ModuleType) -> object:
        """CPU threads as torch's, so that both runtimes are timed on the same cores. Idle
        threads sleep instead of spinning: models are timed side by side in one process (the
        stages of Table 3, both sides of a merge), each session with its own thread pool, and
        a pool still spinning after its call would take the cores from the next one timed."""
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: export warnings are not the user's
        return options

    def prepare(self, model: nn.Module | Callable[[Tensor], Tensor],
                example: Tensor) -> Callable[[], object]:
        onnxruntime = onnxruntime_module()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"the onnxruntime timer exports an nn.Module, not a "
                              f"{type(model).__name__}")
        tensors = chain(model.parameters(), model.buffers(), [example])
        if any(tensor.device.type != "cpu" for tensor in tensors):
            raise ConfigError("the onnxruntime timer runs ONNX Runtime's CPU execution "
                              "provider: give it a model and input on the CPU (--device cpu)")
        training = model.training
        with tempfile.TemporaryDirectory(prefix="depthcut-onnx-") as folder:
            path = Path(folder) / "timed.onnx"
            try:
                with quiet_exporter():
                    export.export_onnx(model, example, path, check=False)
            finally:
                model.train(training)
            session = onnxruntime.InferenceSession(
                str(path), sess_options=self.session_options(onnxruntime),
                providers=["CPUExecutionProvider"])
        try:
            export.check_onnx_session(session, model.eval(), example, CHECK_TOLERANCE)
        except export.ExportError as error:
            raise export.ExportError(
                f"the onnxruntime timer's export of {type(model).__name__} does not reproduce "
                f"PyTorch ({error}); its timings would be of another function") from error
        finally:
            model.train(training)
        feeds = export.onnx_feeds(session, example)
        return lambda: session.run(None, feeds)

    def describe(self) -> str:
        try:
            version = f"ONNX Runtime {onnxruntime_module().__version__}"
        except ConfigError:
            version = "ONNX Runtime not installed"
        return f"onnxruntime ({version}, CPU execution provider), {torch.get_num_threads()} threads"


register_timer(OnnxRuntimeTimer())
