"""Sharded safetensors writing that takes tensors a few at a time.

:class:`ShardedSafetensorsWriter` buffers tensors until a shard is full, writes it, and at
:meth:`~ShardedSafetensorsWriter.close` gives the shards Hugging Face's names
(``model.safetensors``, or ``model-00001-of-00003.safetensors`` ... plus
``model.safetensors.index.json``). Tensors can come block by block, as the driver produces
them, so a model never has to be held twice in memory to be written.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _file_mode() -> int:
    """The mode an ordinary new file gets (0o666 minus the umask); safetensors may create its
    files 0o600, which would hide the checkpoint from other users of a shared machine."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def parse_size(size: int | str) -> int:
    """Bytes from ``5000000``, ``"5MB"`` or ``"2GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"shard size must be positive, got {size}")
        return size
    match = _SIZE.match(str(size))
    if not match:
        raise ValueError(f"shard size {size!r} must be bytes or a number with a unit (e.g. '2GB')")
    return max(1, int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]))


class ShardedSafetensorsWriter:
    """Write named tensors into ``folder`` as safetensors shards of at most ``max_shard_size``.

    A tensor larger than the limit gets a shard of its own. Names must be unique.
    """

    def __init__(self, folder: str | os.PathLike, *, max_shard_size: int | str = "2GB",
                 metadata: Mapping[str, str] | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_storages: set[int] = set()
        self._mode = _file_mode()
        self._shards: list[tuple[Path, list[str]]] = []  # (temporary path, names)
        self._names: set[str] = set()
        self.total_bytes = 0
        self.total_parameters = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("writer is closed")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already written")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        # safetensors refuses tensors that share memory: keep an own copy of any view.
        storage = tensor.untyped_storage()
        if storage.nbytes() != size or storage.data_ptr() in self._buffer_storages:
            tensor = tensor.clone()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_storages.add(tensor.untyped_storage().data_ptr())
        self._buffer_bytes += size
        self._names.add(name)
        self.total_bytes += size
        self.total_parameters += tensor.numel()

    def add_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.add(name, tensor)

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.folder / f"model-part-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buffer, str(path), metadata=self.metadata)
        os.chmod(path, self._mode)
        self._shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0
        self._buffer_storages = set()

    def close(self) -> list[str]:
        """Write the last shard, name the shards, write the index; returns the file names."""
        if self._closed:
            raise RuntimeError("writer is closed")
        self._flush()
        self._closed = True
        if not self._shards:
            raise ValueError("no tensors were written")
        count = len(self._shards)
        if count == 1:
            path, _ = self._shards[0]
            path.rename(self.folder / WEIGHTS_NAME)
            return [WEIGHTS_NAME]
        weight_map: dict[str, str] = {}
        names = []
        for number, (path, tensor_names) in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            names.append(final)
            weight_map.update({tensor_name: final for tensor_name in tensor_names})
        index = {"metadata": {"total_size": self.total_bytes,
                              "total_parameters": self.total_parameters},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return names + [INDEX_NAME]


__all__ = ["INDEX_NAME", "ShardedSafetensorsWriter", "WEIGHTS_NAME", "parse_size"]
