"""Typed errors of obs_compress. Each message names what failed and what to change."""


class ObsCompressError(Exception):
    """Base class of every error obs_compress raises on purpose."""


class InvalidArgument(ObsCompressError, ValueError):
    """A user-supplied value is outside what the method accepts."""


class HessianNotPositiveDefinite(ObsCompressError, ArithmeticError):
    """The (damped) Hessian could not be factorized even after raising the dampening."""


class NonFiniteError(ObsCompressError, ArithmeticError):
    """A weight, activation or Hessian holds NaN or infinity."""


class RecipeError(ObsCompressError, ValueError):
    """A recipe field is unknown or holds a value that is not allowed."""


class ModelLoadError(ObsCompressError, OSError):
    """The model could not be found or loaded as asked."""


class OutputExistsError(ObsCompressError, FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


class UnsupportedModel(ObsCompressError, ValueError):
    """The model has no block stack of prunable layers that the driver can walk."""


class CheckpointFormatError(ObsCompressError, ValueError):
    """A stored tensor of a compressed checkpoint is inconsistent (shape, count, dtype,
    checksum) or names a format outside the fixed table; the message names the tensor."""


class DistributedError(ObsCompressError, RuntimeError):
    """A multi-process run lost a peer (it died, or did not answer within the process-group
    timeout) or its processes disagree; the message names the rank and the step."""
