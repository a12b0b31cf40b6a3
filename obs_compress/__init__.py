"""obs_compress: one-shot pruning of Hugging Face models with Optimal Brain Surgeon."""

from .algorithms import METHODS, PruneResult, prune_weight
from .errors import (HessianNotPositiveDefinite, InvalidArgument, ModelLoadError,
                     NonFiniteError, ObsCompressError, OutputExistsError, RecipeError)
from .math import Curvature, HessianAccumulator, RecursiveInverseAccumulator

__version__ = "0.1.0"

__all__ = [
    "METHODS", "Curvature", "HessianAccumulator", "HessianNotPositiveDefinite", "InvalidArgument",
    "ModelLoadError", "NonFiniteError", "ObsCompressError", "OutputExistsError", "PruneResult",
    "RecipeError", "RecursiveInverseAccumulator", "prune_weight",
]
