"""ONNX export of a (folded) model, checked against PyTorch with onnxruntime when installed.

Optional: needs `pip install depthcut[onnx]` (onnx, onnxscript; onnxruntime for the check).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from depthcut.errors import DepthcutError


class ExportError(DepthcutError, RuntimeError):
    """The export could not be done or did not reproduce the PyTorch model."""


def export_onnx(model: nn.Module, example_input: Tensor, path: str | Path,
                check: bool = True, tolerance: float = 1e-4) -> dict:
    """Write `model` as ONNX to `path`; with onnxruntime, check it on `example_input`.

    Returns {"path", "checked", "max_abs_diff"}; raises ExportError if a needed package is
    missing or the ONNX model's output differs from PyTorch's by more than `tolerance`
    relative to the output's scale.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ExportError(
            f"ONNX export needs the optional packages onnx and onnxscript ({error}); install "
            "them with: pip install -c constraints.txt 'depthcut[onnx]'"
        ) from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    example_input = example_input.cpu()
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example_input,), str(path), dynamo=True)
        except Exception as error:  # noqa: BLE001 - the exporter raises many kinds
            raise ExportError(f"torch.onnx.export failed: {type(error).__name__}: {error}") \
                from error
    result = {"path": str(path), "checked": False, "max_abs_diff": None}
    if not check:
        return result
    try:
        import onnxruntime
    except ImportError:
        return result
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result.update(checked=True, max_abs_diff=check_onnx_session(session, model, example_input,
                                                                tolerance))
    return result


def onnx_feeds(session: object, example_input: Tensor) -> dict:
    """An onnxruntime session's input, `example_input` as the contiguous array it reads."""
    name = session.get_inputs()[0].name
    return {name: example_input.detach().cpu().contiguous().numpy()}


def check_onnx_session(session: object, model: nn.Module, example_input: Tensor,
                       tolerance: float = 1e-4) -> float:
    """The largest |ONNX - PyTorch| over the outputs on `example_input` (every tensor output
    where the ONNX model has as many as PyTorch returns; else the first); ExportError when one
    exceeds `tolerance` relative to its scale (at least 1)."""
    outputs = session.run(None, onnx_feeds(session, example_input))
    with torch.no_grad():
        returned = model(example_input)
    expected = [t for t in torch.utils._pytree.tree_leaves(returned) if isinstance(t, Tensor)]
    pairs = list(zip(outputs, expected, strict=True)) if len(outputs) == len(expected) else [
        (outputs[0], expected[0])]
    worst = 0.0
    for index, (array, reference) in enumerate(pairs):
        got, reference = torch.from_numpy(array), reference.detach().cpu()
        which = f"output {index}" if len(pairs) > 1 else "output"
        if got.shape != reference.shape:
            raise ExportError(f"the ONNX model's {which} has shape {tuple(got.shape)}, "
                              f"PyTorch's {tuple(reference.shape)}")
        diff = float((got.double() - reference.double()).abs().max()) if got.numel() else 0.0
        scale = float(reference.double().abs().max()) if reference.numel() else 0.0
        if not diff <= tolerance * max(scale, 1.0):
            raise ExportError(f"the ONNX model's {which} differs from PyTorch by {diff:.3g} on "
                              "the example")
        worst = max(worst, diff)
    return worst
