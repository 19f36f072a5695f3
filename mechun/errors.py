"""Typed errors. Each message names the problem and the fix, in one line.

All are :class:`MechunError` (a ``ValueError``), so ``except MechunError`` catches every refusal mechun makes; the
command line prints them as ``mechun: error: ...`` and exits with status 1.
"""


class MechunError(ValueError):
    """Bad input to a mechun function: the message says what to change."""


class ModelMismatchError(MechunError):
    """An artifact (cache, direction, SAE, world) was made for a different model than the one given."""


class OutputError(MechunError):
    """An output mechun must not write (it would replace something mechun did not write) or cannot write."""


class DamagedFileError(MechunError):
    """A file mechun reads is truncated or corrupt."""


class CheckpointError(DamagedFileError):
    """A checkpoint dir that would load wrongly: missing or unexpected weights, non-finite weights, or a tokenizer
    that cannot encode text."""


class VocabularyError(MechunError):
    """A word (answer, subject, new object) the tokenizer can only encode as its unknown token."""


class DeviceError(MechunError):
    """A device that this machine does not have."""
