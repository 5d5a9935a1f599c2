"""Errors a user can act on.

Every failure that reaches a user carries a sentence that says what is wrong and what to
do, and names the file or object involved. Deep library tracebacks are wrapped in these.
"""


class RamPlusError(Exception):
    """Base class: anything ramplus raises on purpose."""


class CheckpointError(RamPlusError):
    """The checkpoint cannot be used (missing, unsafe, wrong layout, wrong shapes)."""


class ImageError(RamPlusError):
    """One image cannot be tagged; the job records it and goes on.

    `stage` is where it failed (fetch, decode, infer) so error rows can be grouped.
    """

    def __init__(self, reason: str, stage: str = "decode"):
        super().__init__(reason)
        self.reason = reason
        self.stage = stage


class VocabularyError(RamPlusError):
    """A vocabulary entry is malformed; the message names the tag."""


class ConfigError(RamPlusError):
    """A job setting is wrong; the message names the key."""
