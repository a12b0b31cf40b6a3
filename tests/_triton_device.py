"""Where the kernel tests run their Triton cases: interpreted on CPU, or compiled on a GPU.

* ``TRITON_INTERPRET=1`` (the default that ``conftest.py`` sets): CPU tensors, each
  program run in numpy by the interpreter.
* ``TRITON_INTERPRET=0`` with a CUDA device (``tools/gpu_check.sh``): the same small and
  odd-shaped cases on CUDA tensors, through the compiled kernels, against the same torch
  references computed on CPU.
* ``TRITON_INTERPRET=0`` without a CUDA device: those cases are skipped (Triton can neither
  interpret nor launch them).
"""

import pytest
import torch

from obs_compress_kernels._backend import interpreter_enabled

if interpreter_enabled():
    TRITON_DEVICE = "cpu"
elif torch.cuda.is_available():
    TRITON_DEVICE = "cuda"
else:
    TRITON_DEVICE = None

needs_triton_device = pytest.mark.skipif(
    TRITON_DEVICE is None,
    reason="TRITON_INTERPRET=0 and no CUDA device: the Triton cases need one or the other")


def on_triton_device(*tensors: torch.Tensor):
    """The tensors moved to :data:`TRITON_DEVICE` (a copy of the same values)."""
    moved = tuple(tensor.to(TRITON_DEVICE) for tensor in tensors)
    return moved[0] if len(moved) == 1 else moved
