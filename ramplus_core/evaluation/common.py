"""What the evaluation tools raise and warn, shared so the CLIs can catch one type."""

from __future__ import annotations

from ..errors import RamPlusError


class EvaluationError(RamPlusError):
    """Inputs to an evaluation, calibration or report cannot be used; the message says which."""


class ScoreFloorWarning(UserWarning):
    """The run kept only scores over a floor above 0, so mAP is approximate."""
