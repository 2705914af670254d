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
    """The largest |ONNX - PyTorch| of the first output on `example_input`; ExportError when
    it exceeds `tolerance` relative to the output's scale (at least 1)."""
    got = torch.from_numpy(session.run(None, onnx_feeds(session, example_input))[0])
    with torch.no_grad():
        expected = model(example_input)
    if isinstance(expected, (tuple, list)):
        expected = expected[0]
    if got.shape != expected.shape:
        raise ExportError(f"the ONNX model's output has shape {tuple(got.shape)}, PyTorch's "
                          f"{tuple(expected.shape)}")
    diff = float((got - expected.detach().cpu()).abs().max())
    if not diff <= tolerance * max(float(expected.abs().max()), 1.0):
        raise ExportError(f"the ONNX model differs from PyTorch by {diff:.3g} on the example")
    return diff
