"""Backend choice shared by every kernel: Triton for CUDA tensors, torch otherwise."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for ``tensor``; errors say what to change.

    ``auto`` picks Triton only for CUDA tensors (and only when Triton is installed): the
    interpreter is far too slow for real work. ``triton`` on a CPU tensor needs the
    interpreter, enabled by ``TRITON_INTERPRET=1`` before the kernels are imported.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if not tensor.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "backend='triton' on CPU tensors runs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing obs_compress_kernels (tests only; use backend='torch' on CPU)")
    return "triton"
