"""The value types settings files are checked against (job config, vocabulary files).

YAML gives typed values already, so the types are strict: `"8"` is not an integer and `yes`
is not a number, where pydantic's default would coerce them and hide a typo. An integer is
accepted where a number is asked for; NaN and infinity never are (`.inf` retries would run
forever, a NaN threshold compares false with everything).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict

MAX_URI = 4096  # PATH_MAX; an S3 key is at most 1024 bytes


def matching(pattern: str, says: str) -> AfterValidator:
    """A string check by regular expression whose message is `says` (not the pattern)."""
    rx = re.compile(pattern)

    def check(v: str) -> str:
        if not rx.match(v):
            raise ValueError(says)
        return v
    return AfterValidator(check)


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must be a non-empty string")
    return v


def _one_is_a_list(v):
    return [v] if isinstance(v, str) else v


def listed(item):
    """A list of `item`s, held as a tuple (hashable, immutable); a single string is a list of one."""
    return Annotated[tuple[item, ...], BeforeValidator(_one_is_a_list)]


Int = Annotated[int, Strict()]
Num = Annotated[float, Strict()]
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict(), Field(max_length=MAX_URI), AfterValidator(_not_blank)]
Texts = listed(Text)


class Section(BaseModel):
    """Unknown keys refused, values checked for type and range, instances immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)
