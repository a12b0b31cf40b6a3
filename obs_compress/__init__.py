"""obs_compress: one-shot pruning of Hugging Face models with Optimal Brain Surgeon."""

import os as _os
import sys as _sys

# torch's CPU allocator backs allocations of 2 MiB and more with transparent huge pages when
# THP_MEM_ALLOC_ENABLE is set as torch loads (it reads it once). With 4 KiB pages a streaming
# 1.5B-shaped block either paid first-touch page faults for its large temporaries (glibc's
# mmap threshold fixed at 4 MiB: 5.5M faults a 2-block run, block 10.0-10.3 s against 7.9-8.3)
# or kept them in a fragmented heap (glibc's default threshold: the higher peak); with huge
# pages and the default threshold, 0.32M faults (docs/benchmarks.md, 1.5B section). Set here,
# before torch is imported, unless the caller chose a value; a streaming run logs whether it
# took effect.
THP_ALLOCATION = (f"THP_MEM_ALLOC_ENABLE={_os.environ['THP_MEM_ALLOC_ENABLE']} set by the caller"
                  if "THP_MEM_ALLOC_ENABLE" in _os.environ
                  else "off: torch was imported before obs_compress" if "torch" in _sys.modules
                  else "on")
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
