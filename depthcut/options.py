"""One flat setting, declared beside the dataclass field it sets.

A setting has one name everywhere: the `--config` file's key, the preset's key and, with dashes,
the command-line flag. `depthcut.settings` maps settings onto the config dataclasses and the CLI
builds its options from them; nothing lists the flags a second time.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Option:
    """A setting `key` that sets the field at `path` ("delta", "finetune.epochs") of the config
    class it is declared for, or of every training (`TrainConfig`) of a run when `owner` is
    TrainConfig. `argparse` holds add_argument's keywords (type, choices, action, nargs,
    metavar); `choices` may be a callable, read when the parser is built (registries grow)."""

    key: str
    help: str | None = None
    path: str = ""  # default: key
    flags: tuple[str, ...] = ()  # default: --key with dashes
    owner: type | None = None  # default: the config class the option is declared for
    argparse: dict[str, Any] = field(default_factory=dict)

    @property
    def field_path(self) -> str:
        return self.path or self.key

    @property
    def flag_names(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.key.replace("_", "-"),)

    def with_flags(self, *flags: str) -> Option:
        return Option(self.key, self.help, self.path, flags, self.owner, self.argparse)

    def add_to(self, group: argparse._ActionsContainer) -> None:
        """Add this option to a parser or group; unset flags stay out of the namespace
        (argparse.SUPPRESS), so presets and config files fill them."""
        kwargs = dict(self.argparse)
        choices = kwargs.get("choices")
        if callable(choices):
            kwargs["choices"] = choices()
        kwargs.setdefault("default", argparse.SUPPRESS)
        group.add_argument(*self.flag_names, dest=self.key, help=self.help, **kwargs)


def add_options(group: argparse._ActionsContainer, options: Sequence[Option],
                seen: set[str] | None = None) -> None:
    """Add `options` to `group`, skipping keys in `seen` (a setting shared by several methods
    appears once per command) and adding the new ones to it."""
    for option in options:
        if seen is not None:
            if option.key in seen:
                continue
            seen.add(option.key)
        option.add_to(group)
