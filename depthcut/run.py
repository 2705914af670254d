"""Run directories: per-stage records (JSON lines), checkpoints, summary; written atomically."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthcut.checkpoint_files import explain_unreadable
from depthcut.distributed import is_main
from depthcut.errors import DepthcutError
from depthcut.faults import die_at
from depthcut.layers import ChannelScale
from depthcut.masks import apply_masks, masks_from_state_dict
from depthcut.models import ModelSpec
from depthcut.run_lock import RunLock
from depthcut.sites import linearize, scale_sites, silence
from depthcut.train import Checkpointing

CHECKPOINT_FORMAT = "depthcut-checkpoint/1"
RECORDS = "records.jsonl"
SNAPSHOT = "resume.pt"  # the last finished epoch of the training call in progress


class RunDirError(DepthcutError, FileExistsError):
    """The run directory cannot be used (it already holds another run)."""


class CheckpointError(DepthcutError, ValueError):
    """A file is not a depthcut checkpoint, or does not fit the model it names."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data[: len(data) // 2])
            die_at(f"write:{path.name}")  # the resume tests kill a run half-way through a write
            handle.write(data[len(data) // 2:])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: store them as null so every JSON reader can load the records."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    """torch.save, written to a temporary file and renamed (never half a checkpoint)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _load_payload(path: str | Path, what: str, weights_only: bool) -> tuple[Path, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist or is not a file")
    try:
        return path, torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(
            f"{path} is not a readable {what}: {explain_unreadable(path, error)}") from None


def check_writable(path: str | Path, *, folder: bool, flag: str = "--out") -> None:
    """Refuse an output path that cannot be written, before any data is decoded: a file where
    a folder should be (the path itself, or a folder above it), or a folder without write
    permission. `folder`: `path` is a folder to create (else a file to write)."""
    path = Path(path).absolute()
    if folder and path.exists() and not path.is_dir():
        raise RunDirError(f"{flag} {path} exists and is not a directory: choose another {flag}")
    if not folder and path.is_dir():
        raise RunDirError(f"{flag} {path} is a directory: name a file, e.g. {path / 'model.pt'}")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"cannot create {flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write {flag} {path}: no write permission in {existing}")


def write_json(path: Path, obj: Any) -> None:
    if not is_main():
        return
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2) + "\n")


class RunDir:
    """A run's output folder: config.json, records.jsonl, checkpoints/, summary.md, and the
    lock (`depthcut.run_lock`) held from `start()` to `release()`."""

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
        """Check that `path` can take this run; nothing is written until `start()`.

        With `resume`, the folder must hold a run (config.json); its records are kept. A
        folder another live run holds is refused, with `overwrite` and `resume` too.
        """
        self.path = Path(path)
        self.overwrite = overwrite
        self.resume = resume
        self.lock = RunLock(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"run directory {self.path} exists and is not a directory")
        check_writable(self.path, folder=True, flag="--resume" if resume else "--out")
        if is_main():
            self.lock.check_free()
        if resume:
            if overwrite:
                raise RunDirError("choose one of --resume and --overwrite")
            if not (self.path / "config.json").is_file():
                raise RunDirError(f"nothing to resume in {self.path}: it holds no run "
                                  "(no config.json)")
            self.records = read_records(self.path) if (self.path / RECORDS).exists() else []
            return
        if (self.path / RECORDS).exists() and not overwrite:
            raise RunDirError(
                f"{self.path} already holds a run ({RECORDS} exists). Choose another --out, "
                "or pass --overwrite to replace it."
            )
        self.records: list[dict] = []

    def start(self) -> None:
        """Create the folder and take its lock (clearing an old run when overwriting), once
        inputs are checked. Call `release()` when the run ends, however it ends."""
        if not is_main():  # under torch.distributed only rank 0 writes
            return
        self.lock.acquire()
        if self.resume:
            for stale in self.path.rglob(".*.tmp"):  # a write the kill interrupted
                stale.unlink()
            return
        if self.overwrite:
            (self.path / SNAPSHOT).unlink(missing_ok=True)
            for stale in (RECORDS, "summary.md", "config.json"):
                (self.path / stale).unlink(missing_ok=True)
            for checkpoint in (self.path / "checkpoints").glob("*.pt"):
                checkpoint.unlink()
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)

    def release(self) -> None:
        """The run has ended (finished, failed or interrupted): free the folder."""
        self.lock.release()

    def write_config(self, config: dict) -> None:
        if is_main():
            write_json(self.path / "config.json", config)

    def add_record(self, record: dict) -> None:
        self.records.append(_json_safe(record))
        if is_main():
            lines = "".join(json.dumps(r) + "\n" for r in self.records)
            atomic_write_text(self.path / RECORDS, lines)

    def checkpoint_path(self, stage: int) -> Path:
        return self.path / "checkpoints" / f"stage_{stage:02d}.pt"

    def snapshot(self, name: str) -> Checkpointing:
        """Epoch-level checkpointing for the training call `name` (one file, replaced
        atomically after every epoch; a snapshot of another call is ignored)."""
        path = self.path / SNAPSHOT

        def save(state: dict) -> None:
            if not is_main():
                return
            atomic_torch_save(path, {"name": name, "state": state})

        def load() -> dict | None:
            if not path.is_file():
                return None
            payload = torch.load(path, map_location="cpu", weights_only=False)
            return payload["state"] if payload.get("name") == name else None

        return Checkpointing(save=save, load=load)

    def finish(self) -> None:
        """The run is complete: the epoch snapshot is no longer needed."""
        if is_main():
            (self.path / SNAPSHOT).unlink(missing_ok=True)

    def write_summary(self, text: str) -> None:
        if is_main():
            atomic_write_text(self.path / "summary.md", text)


def read_records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / RECORDS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    spec: ModelSpec | None,
    linearized: Sequence[str],
    extra: dict | None = None,
    silenced: Sequence[str] = (),
) -> None:
    """Everything needed to rebuild the model: its spec, the linearized, silenced and scaled
    (ChannelScale) sites, and the weights (a pruned module's state holds weight_orig and its
    weight_mask; a ChannelScale's state holds its scale). `spec` None: a model built in
    Python (`depthcut.easier(model, ...)`): loading it needs that model as a template."""
    if not is_main():
        return
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": spec.to_dict() if spec is not None else None,
        "linearized": list(linearized),
        "silenced": list(silenced),
        "scaled": {name: module.dim for name, module in model.named_modules()
                   if isinstance(module, ChannelScale)},
        "state_dict": state,
        "extra": extra or {},
    }
    atomic_torch_save(Path(path), payload)


def load_checkpoint(path: str | Path, template: nn.Module | None = None
                    ) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by `save_checkpoint`; returns (model in eval mode, checkpoint info).

    A checkpoint of a model built in Python (no spec) is rebuilt from a copy of `template`, the
    dense model it started from (its sites not yet linearized)."""
    path, payload = _load_payload(path, "checkpoint", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a depthcut checkpoint (format {CHECKPOINT_FORMAT}). A plain "
            "state_dict (or another tool's checkpoint) loads with --model MODEL --weights FILE "
            "(--weights-trained: it is the dense model), or becomes a checkpoint with "
            "`depthcut import-model --model MODEL --weights FILE --dataset D --out CKPT.pt`")

    if payload["model"] is not None:
        spec = ModelSpec(**payload["model"])
        base = spec.build()
    elif template is not None:
        spec, base = None, copy.deepcopy(template).cpu()
    else:
        raise CheckpointError(
            f"{path} holds a model built in Python (depthcut.easier(model, ...) and the like), "
            "which depthcut cannot rebuild by name: load it with "
            "depthcut.run.load_checkpoint(path, template=the_dense_model), or run the method "
            "again with the same model and resume=True")
    model = silence(linearize(base, payload["linearized"]), payload.get("silenced", []))
    scaled = payload.get("scaled", {})
    try:
        scale_sites(model, {name: payload["state_dict"][f"{name}.scale"] for name in scaled},
                    scaled)
        apply_masks(model, masks_from_state_dict(payload["state_dict"]))
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} does not fit model {spec}: {error}") from error
    model.eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    info["spec"] = spec
    return model, info


FOLDED_FORMAT = "depthcut-folded/1"


def save_folded(path: str | Path, module: nn.Module, extra: dict | None = None) -> None:
    """Save a folded model (a torch.fx GraphModule: its code and weights) with its report."""
    if not is_main():
        return
    report = getattr(module, "fold_report", None)
    payload = {
        "format": FOLDED_FORMAT,
        "module": module.cpu(),
        "report": report.to_dict() if report is not None else None,
        "extra": extra or {},
    }
    atomic_torch_save(Path(path), payload)


def load_folded(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a model saved by `save_folded`: (module in eval mode, info with report and extra).

    A folded model is stored as a pickled GraphModule, so loading it runs pickle: load only
    files you made or trust (the same rule as torch.load with weights_only=False).
    """
    path, payload = _load_payload(path, "folded model", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FOLDED_FORMAT:
        raise CheckpointError(
            f"{path} is not a folded depthcut model (format {FOLDED_FORMAT}); "
            "make one with `depthcut fold --checkpoint STAGE.pt --out FOLDED.pt`"
        )
    module = payload["module"].eval()
    return module, {k: v for k, v in payload.items() if k != "module"}

