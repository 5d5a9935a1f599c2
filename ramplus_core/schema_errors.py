"""One short sentence for a settings mistake, whatever the value that caused it.

pydantic checks the config and vocabulary files; its own report lists every error with its
input in full, which for a 5 MB string (or a value that expands) is a multi-megabyte line.
A nightly job's log wants one line that names the key and what it should be, so only the
first error is told, every value shown is cut to a few dozen characters (reprlib slices
before it formats, so the cost does not depend on the value's size), secrets are never
shown, and an unknown key comes with the nearest known one.
"""

from __future__ import annotations

import difflib
import reprlib
import types
import typing
from typing import Container, Optional

from pydantic import BaseModel, ValidationError

SHOWN = 80  # characters of any value or name a message repeats

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = SHOWN
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxlevel = 2


def clip(text, n: int = SHOWN) -> str:
    """`text` cut to at most n characters, '...' marking the cut (anything else: its bounded repr)."""
    text = text if isinstance(text, str) else _repr.repr(text)
    return text if len(text) <= n else text[:n - 3] + "..."


def shown(value) -> str:
    """A bounded repr of a value for a message."""
    return clip(_repr.repr(value))


def dotted(loc) -> str:
    """('listing', 'extensions', 0) -> 'listing.extensions[0]' (each name clipped)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + clip(str(part), 40))
    return out


class KeyProblem(ValueError):
    """Raised by a model validator about one of its fields: the message is then placed under it."""

    def __init__(self, key: str, text: str):
        super().__init__(text)
        self.key, self.text = key, text


# pydantic's error types in our words; the rest keep pydantic's message ("Input should ...").
_SAY = {
    "missing": "must be set",
    "model_type": "must be a mapping of keys to values",
    "model_attributes_type": "must be a mapping of keys to values",
    "dict_type": "must be a mapping of keys to values",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "literal_error": "must be one of {expected}",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be at most {le}",
    "too_short": "must not be empty",
    "too_long": "must have at most {max_length} items",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters",
}


def _fields_at(model: type[BaseModel], path) -> list[str]:
    """The field names of the (nested) model reached by `path`, for the 'did you mean' hint."""
    for part in path:
        if isinstance(part, int):
            continue
        info = _by_key(model).get(part)
        sub = _model_in(info.annotation) if info is not None else None
        if sub is None:
            return []
        model = sub
    return list(_by_key(model))


def _by_key(model: type[BaseModel]) -> dict:
    """Fields by the key a file uses for them (`import`, not `import_`)."""
    return {info.alias or name: info for name, info in model.model_fields.items()}


def _model_in(tp) -> Optional[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType, list, tuple, typing.Annotated):
        for arg in typing.get_args(tp):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def explain(err: ValidationError, model: type[BaseModel], hidden: Container[str] = ()) -> str:
    """One sentence for the first error in `err`, naming its dotted key.

    `hidden`: field names whose values are never shown (secrets).
    """
    e = err.errors(include_url=False)[0]
    loc, kind, ctx = tuple(e["loc"]), e["type"], e.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        near = difflib.get_close_matches(str(loc[-1])[:100], known, n=1)
        hint = f"did you mean '{dotted(loc[:-1] + (near[0],))}'?" if near else f"known keys here: {', '.join(known)}"
        return f"unknown key '{dotted(loc)}'; {hint}"
    if kind == "value_error" and isinstance(ctx.get("error"), KeyProblem):
        return f"{dotted(loc + (ctx['error'].key,))}: {ctx['error'].text}"
    if kind == "value_error":
        text = clip(str(ctx.get("error") or e["msg"]), 200)
    elif kind == "too_long" and isinstance(e.get("input"), str):
        text = _SAY["string_too_long"].format(**ctx)
    elif kind in _SAY:
        text = _SAY[kind].format(**{k: clip(str(v), 120) for k, v in ctx.items()})
    else:
        text = clip(e["msg"].replace("Input should", "should"), 200)
    named = [p for p in loc if isinstance(p, str)]
    if named and named[-1] in hidden:
        text += " (value not shown: it is a secret)"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        text += f", got {type(e.get('input')).__name__}"
    elif kind != "missing":
        text += f", got {shown(e.get('input'))}"
    return f"{dotted(loc) or 'the file'}: {text}"
