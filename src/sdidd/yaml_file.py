"""YAML as sdidd reads it (recipes, dataset descriptions, overrides): safe types only, and no aliases.

Aliases (`*name`) are refused: nested ones expand a few hundred bytes into gigabytes ("billion laughs"),
and no recipe or dataset description needs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import SdiddError


class AliasRefused(yaml.YAMLError):
    """A YAML alias where sdidd reads configuration."""

    def __init__(self, anchor: str, line: int) -> None:
        super().__init__(f"YAML aliases are not supported (*{anchor} on line {line}); write the value out")


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D102 - PyYAML's hook
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise AliasRefused(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """`text` as YAML (safe types); AliasRefused for an alias, another yaml.YAMLError for broken YAML."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: Path) -> Any:
    """The YAML file `path`; one SdiddError line naming it when it is unreadable, not YAML, or uses aliases."""
    try:
        return parse_yaml(path.read_text())
    except AliasRefused as e:
        raise SdiddError(f"{path}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as e:
        mark = getattr(e, "problem_mark", None)
        raise SdiddError(f"{path}: not valid YAML{f' (line {mark.line + 1})' if mark else ''}") from None
