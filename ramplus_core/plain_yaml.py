"""YAML for settings files: plain values, lists and mappings, nothing that can grow or run.

Config files, `--set` values and vocabulary files are read here. `yaml.safe_load` already
refuses language tags (`!!python/object/apply`), but it still expands anchors and aliases:
ten lines of `&a [*b, *b, ...]` describe 10^9 strings, which any later formatting or
validation of the value walks in full (the "billion laughs"). Settings never need to repeat
a value by reference, so an anchor or alias is refused at the first one, before anything is
built, and every message this module writes is one short line.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .schema_errors import clip


class AliasRefused(yaml.MarkedYAMLError):
    """An anchor (`&name`) or alias (`*name`) in a settings file."""


# libyaml when the installed PyYAML has it: a 5 MB file parses in 0.1 s instead of ~10 s
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(text: str) -> Any:
    """The document in `text` as plain Python data; raises yaml.YAMLError (see `problem`).

    The events are checked first (cheap: nothing is built), then the document is loaded.
    """
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise AliasRefused(problem="YAML aliases are not allowed", problem_mark=event.start_mark)
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader


def problem(e: yaml.YAMLError) -> str:
    """One bounded line for a YAML error, with where it is.

    A language-specific tag is named as refused: in a settings file it is either a mistake or
    an attempt to run code, and "not valid YAML" would hide which.
    """
    where = ""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        where = f" (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(e, AliasRefused):
        return (f"YAML aliases are not allowed{where}: anchors (&name) and aliases (*name) can expand a few "
                "lines into billions of values; write each value out")
    text = str(getattr(e, "problem", None) or e)
    if isinstance(e, yaml.constructor.ConstructorError) and "constructor for the tag" in text:
        tag = re.search(r"tag '([^']*)'", text)
        return (f"refused: the YAML tag {clip(tag.group(1) if tag else '')!r}{where} would build a program "
                "object; only plain values, lists and mappings are allowed")
    return f"not valid YAML{where}: {clip(' '.join(text.split()), 160)}"
