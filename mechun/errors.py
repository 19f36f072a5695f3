"""Typed errors. Each message names the fix."""


class MechunError(ValueError):
    """Bad input to a mechun function: the message says what to change."""


class ModelMismatchError(MechunError):
    """An artifact (cache, direction, SAE) was computed on a different model than the one given."""
