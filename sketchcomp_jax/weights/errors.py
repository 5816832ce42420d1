"""Errors raised while reading or converting checkpoints. All are `ValueError`s with a message that
names the file or key at fault and says what to do."""


class CheckpointError(ValueError):
    """Base class: a weights file cannot be used."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The weights path does not exist."""


class CheckpointIsADirectoryError(CheckpointError, IsADirectoryError):
    """A directory was given where a weights file is expected."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated or damaged (bad zip archive, short storage, bad safetensors header)."""


class UnknownFormatError(CheckpointError):
    """The file is none of the supported weight formats (or an unsupported variant of one)."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle references a global outside the allow-list; it was refused and nothing was executed."""


class NotAStateDictError(CheckpointError):
    """The file was read but holds no flat dict of tensors (nor a Lightning `state_dict` entry)."""


class DiffusersFolderError(CheckpointError):
    """A diffusers pipeline folder is missing its components, configs or weights files."""


class ExportError(CheckpointError):
    """The export cannot be written: bad format / dtype / output path, or the model cannot be expressed."""


class TrainingCheckpointsUnavailableError(ExportError, NotImplementedError):
    """`--workdir` has no (readable) training checkpoints."""
