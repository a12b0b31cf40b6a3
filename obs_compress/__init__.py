"""obs_compress: one-shot pruning of Hugging Face models with Optimal Brain Surgeon."""

from .algorithms import METHODS, PruneResult, prune_weight
from .errors import (HessianNotPositiveDefinite, InvalidArgument, ModelLoadError,
                     NonFiniteError, ObsCompressError, OutputExistsError, RecipeError)
from .math import Curvature, HessianAccumulator, RecursiveInverseAccumulator

__version__ = "0.1.0"

# Stock ``from_pretrained`` loads our compressed folders once obs_compress is imported
# (issue 12): the quantizer is registered now, which imports transformers' quantizer table.
from .export.hf_quantizer import register as _register_quantizer  # noqa: E402

_register_quantizer()

# The pipeline pulls in transformers; it is imported on first use so that the math core
# (prune_weight and the accumulators) stays a light import.
_PIPELINE = {"oneshot": "api", "save_pretrained": "api", "load_pretrained": "api", "load_recipe": "recipe", "Recipe": "recipe",
             "sparse_inference": "inference", "SparseInferenceReport": "inference"}


def __getattr__(name):
    if name in _PIPELINE:
        import importlib

        return getattr(importlib.import_module(f".{_PIPELINE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "METHODS", "Curvature", "HessianAccumulator", "HessianNotPositiveDefinite", "InvalidArgument",
    "ModelLoadError", "NonFiniteError", "ObsCompressError", "OutputExistsError", "PruneResult",
    "Recipe", "RecipeError", "RecursiveInverseAccumulator", "SparseInferenceReport", "load_pretrained", "load_recipe",
    "oneshot", "prune_weight", "save_pretrained", "sparse_inference",
]
