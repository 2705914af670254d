"""Why torch.load refused a file, in one line a user can act on.

torch's own messages for a bad file run to several paragraphs with terminal colour codes
(weights_only) or speak of miniz internals. `explain_unreadable` looks at the file itself
without unpickling it (unpickling a stranger's file can run any code): the zip or pickle
header, whether the zip's directory at its end is there, and the names of the Python globals
its pickle refers to, which tell a whole pickled model from a dict of tensors.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format is a zip archive
PICKLE_PROTOCOL = b"\x80"  # a pickle of protocol 2 or later (torch's legacy format)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Globals that a pickle of plain tensors and containers refers to (torch.load with
# weights_only=True accepts them).
_DATA_GLOBALS = ("torch._utils.", "torch.storage.", "collections.OrderedDict", "torch.Size",
                 "torch.device", "torch.serialization.", "builtins.", "_codecs.encode")

SAVE_CHECKPOINT_CODE = ("from depthcut import ModelSpec; from depthcut.run import save_checkpoint; "
                        "save_checkpoint(PATH, model, ModelSpec(NAME, num_classes=N, width=W), "
                        "linearized=[])")


def explain_unreadable(path: Path, error: BaseException) -> str:
    """What `path` is, given that torch.load failed on it with `error`: one line."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
    if size == 0:
        return "the file is empty (0 bytes)"
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return (f"truncated ({size} bytes): a torch.save zip archive whose end is missing "
                    "(an interrupted save, copy or download)")
        pickled = _zip_pickle(path)
        if pickled is None:
            return f"a zip archive ({size} bytes) but not one torch.save wrote (no data.pkl)"
        objects = pickled_objects(pickled)
        if objects:
            return pickled_object_text(objects[0])
        if isinstance(error, zipfile.BadZipFile) or "CRC" in str(error):
            return f"corrupt ({size} bytes): a member of its zip archive fails its checksum"
    elif head.startswith(PICKLE_PROTOCOL):
        if isinstance(error, EOFError) or "truncated" in str(error).lower():
            return f"truncated ({size} bytes): a pickle whose end is missing"
        objects = pickled_objects(path.read_bytes())
        if objects:
            return pickled_object_text(objects[0])
    else:
        return (f"not a zip or pickle file ({size} bytes starting {head[:4].hex(' ')}), so "
                "not something torch.save wrote")
    return first_line(error)


def pickled_object_text(name: str) -> str:
    return (f"it holds a pickled Python object ({name}: a whole model saved with "
            "torch.save(model)?), which depthcut does not unpickle since that can run any "
            f"code; save its state_dict as a depthcut checkpoint instead: `{SAVE_CHECKPOINT_CODE}`")


def first_line(error: BaseException) -> str:
    """`error`'s message without colour codes, its first line only."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _zip_pickle(path: Path) -> bytes | None:
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if name.endswith("/data.pkl")
                 or name == "data.pkl"]
        return archive.read(names[0]) if names else None


def pickled_objects(data: bytes) -> list[str]:
    """The classes and functions a pickle refers to beyond tensors and containers, read from
    its opcodes (nothing is imported or run)."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                found.append(str(argument).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(argument, str):
                strings.append(argument)
    except (ValueError, EOFError):  # a damaged pickle: what was read so far
        pass
    return [name for name in found if not name.startswith(_DATA_GLOBALS)
            and not name.endswith("Storage") and not _is_torch_constant(name)]


def _is_torch_constant(name: str) -> bool:
    """torch.float32, torch.bfloat16, ...: dtypes and other lower-case torch attributes."""
    parts = name.split(".")
    return len(parts) == 2 and parts[0] == "torch" and parts[1].islower()
