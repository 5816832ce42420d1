"""Errors raised while reading or converting checkpoints. All are `ValueError`s with a message that
names the file or key at fault and says what to do."""


class CheckpointError(ValueError):
    """Base class: a weights file cannot be used."""
