"""Where the current block's calibration activations live between two blocks.

The driver keeps one hidden-state tensor per calibration batch, ``(batch, seq_len, hidden)``
in the model's dtype: block ``b``'s outputs are block ``b + 1``'s inputs, and batch ``i``'s
output replaces its input as soon as it is computed (each batch is independent). Where:

* ``device``: on the compute device (the GPU when the block runs there), as produced;
* ``cpu``: in CPU memory, one preallocated buffer per batch (pinned when the compute device
  is CUDA, so the copies both ways run at full bus speed); each call moves its batch to the
  device (:attr:`~obs_compress.model.capture.BlockCall.device`);
* ``disk``: one memory-mapped file in the work folder (``torch.from_file``, shared), every
  batch a view into it; the kernel pages it in and out, so resident memory holds only the
  batches being read or written.

The values are the same in every place (same dtype, copied, never recomputed), so the
pruned weights are the same bytes. The choice is made by
:func:`obs_compress.memory_plan.choose_activations`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InvalidArgument
from .capture import BlockCall

logger = logging.getLogger(__name__)

PLACEMENTS = ("device", "cpu", "disk")
DISK_FILE = "activations.bin"


class ActivationStore:
    """The hidden states of every calibration batch, held in one place (module docstring).

    ``device``: where blocks run (None: where the model is); ``folder``: where ``disk``
    puts its file (a fresh temporary folder inside it, removed by :meth:`close`; None: the
    system's temporary folder)."""

    def __init__(self, placement: str, device: torch.device | None,
                 folder: str | Path | None = None):
        if placement not in PLACEMENTS:
            raise InvalidArgument(f"activations {placement!r}: allowed are "
                                  f"{', '.join(PLACEMENTS)} (or auto)")
        self.placement = placement
        self.device = device
        self.folder = folder
        self._buffers: list[torch.Tensor] = []
        self._work: Path | None = None

    def hold_(self, calls: Sequence[BlockCall]) -> None:
        """Move each call's hidden states to their place; calls then move them back to the
        device themselves when a block runs on them."""
        if self.placement == "device":
            return
        shapes = [(tuple(c.hidden_states.shape), c.hidden_states.dtype) for c in calls]
        if self.placement == "cpu":
            pin = self.device is not None and self.device.type == "cuda"
            self._buffers = [torch.empty(shape, dtype=dtype, pin_memory=pin)
                             for shape, dtype in shapes]
        else:
            self._buffers = self._mapped(shapes)
        for call, buffer in zip(calls, self._buffers):
            buffer.copy_(call.hidden_states)
            call.hidden_states = buffer
            call.device = self.device

    def _mapped(self, shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
        dtypes = {dtype for _, dtype in shapes}
        if len(dtypes) != 1:
            raise InvalidArgument(f"calibration batches of several dtypes {sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
        sizes = [int(torch.Size(shape).numel()) for shape, _ in shapes]
        self._work = Path(tempfile.mkdtemp(prefix=".activations-", dir=self.folder))
        path = self._work / DISK_FILE
        mapped = torch.from_file(str(path), shared=True, size=sum(sizes), dtype=dtype)
        logger.info("calibration activations on disk: %s (%.1f MB, memory-mapped)", path,
                    sum(sizes) * mapped.element_size() / 1e6)
        return [part.view(shape) for part, (shape, _) in zip(mapped.split(sizes), shapes)]

    def replace_(self, call: BlockCall, hidden_states: torch.Tensor) -> None:
        """``hidden_states`` (a block's output for this call's batch) become its input."""
        if self.placement == "device":
            call.hidden_states = hidden_states
            return
        call.hidden_states.copy_(hidden_states)

    def close(self) -> None:
        """Drop the buffers and remove the disk file (idempotent)."""
        self._buffers = []
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None


__all__ = ["DISK_FILE", "PLACEMENTS", "ActivationStore"]
