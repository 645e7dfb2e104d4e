"""Exception types. Every message names the file/field at fault and the fix."""


class DeepSpecError(Exception):
    """Base class for user-facing errors of deepspec_jax."""


class ConfigError(DeepSpecError, ValueError):
    """A config file or field is missing, malformed or unsupported."""


class CheckpointError(DeepSpecError, ValueError):
    """A checkpoint is missing tensors, has extra ones, or has wrong shapes/dtypes."""
