"""The one safetensors writer: a checkpoint's tensors, shard by shard, as they become ready.

Every run writes its weights through :class:`ShardWriter`: the in-memory path hands it the
whole state dict at once, the streaming path one block at a time. Both give the same files
byte for byte, because the layout (which tensor goes in which file, under which name) is
decided from the model's structure alone (:func:`checkpoint_layout`, which works on a model
whose weights are still on the meta device) and each file's bytes from its tensors alone
(:func:`write_safetensors`).

* Names: the model's state dict with tied copies removed and transformers' loading-time
  renames reverted (its own ``remove_tied_weights_from_state_dict`` and
  ``revert_weight_conversion``), so the files are what ``save_pretrained`` writes.
* Shards: ``huggingface_hub.split_torch_state_dict_into_shards`` (``model.safetensors``, or
  ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``).
* Every tensor passes through :func:`tensors_for_file`, the one place where a tensor of the
  model becomes the tensors stored for it.
* A shard whose tensors all arrive in one :meth:`ShardWriter.add` (the in-memory path) is
  written in one go (to ``<name>.tmp``, then renamed). A shard whose tensors arrive block by
  block is filled in place: its header is known from the layout, so ``<name>.partial`` is
  created at its full size and each tensor is written once, at its offset, and flushed to
  disk; the file is renamed when its last tensor is in. Memory holds one block, not one
  shard, and nothing is written twice. A compressed weight's stored size depends on its mask,
  so a shard holding one is only known once all its tensors are: those tensors wait in a
  staging file (``staging/part-<label>.safetensors``) until then. What is in place or staged
  is what a resumed run picks up (:mod:`obs_compress.export.progress`).

File format (https://github.com/huggingface/safetensors#format): 8 bytes little-endian
header length, a JSON header (``__metadata__`` first, then the tensors in the order of their
data; compact, padded with spaces to a multiple of 8), then the raw little-endian data. The
order is safetensors' own (wider dtypes first, then by name), so a file equals what
``safetensors.torch.save_file`` writes for the same tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import CheckpointFormatError, InvalidArgument
from .encoding import WeightEncoding, encode_weight
from .formats import stored_names

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
STAGING_DIR = "staging"
PARTIAL_SUFFIX = ".partial"  # a shard being filled in place
FILE_METADATA = {"format": "pt"}  # what transformers writes into every shard

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def tensors_for_file(name: str, tensor: torch.Tensor,
                     encoding: WeightEncoding | None = None) -> dict[str, torch.Tensor]:
    """The tensors stored in the checkpoint for the model's tensor ``name``.

    Dense (``encoding`` None): the tensor itself, zeros in place. A compressed format
    (:mod:`.encoding`): the pruned weight's stored tensors (``NAME.bitmask``, ``NAME.values``,
    ...), the one place where a weight becomes several stored tensors.
    """
    return encode_weight(name, tensor, encoding)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` as stored (C order, native little-endian)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _header(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
            metadata: Mapping[str, str] | None) -> tuple[bytes, list[tuple[str, int]]]:
    """The padded JSON header and each tensor's ``(name, nbytes)`` in data order."""
    ordered = sorted(entries, key=lambda e: (-torch.empty((), dtype=e[1]).element_size(), e[0]))
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    sizes = []
    for name, dtype, shape in ordered:
        if dtype not in _DTYPE_NAMES:
            raise InvalidArgument(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = torch.empty((), dtype=dtype).element_size()
        for size in shape:
            nbytes *= size
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        sizes.append((name, nbytes))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, sizes


def _data_offsets(sizes: list[tuple[str, int]]) -> dict[str, int]:
    """Each tensor's offset in the data section, from :func:`_header`'s sizes."""
    offsets, offset = {}, 0
    for name, nbytes in sizes:
        offsets[name] = offset
        offset += nbytes
    return offsets


def write_safetensors(path: Path, shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                      tensor: Callable[[str], torch.Tensor],
                      metadata: Mapping[str, str] | None = FILE_METADATA) -> str:
    """Write a safetensors file holding ``shapes``' tensors, fetching each by ``tensor(name)``
    only when its bytes are due (so one tensor at a time is in memory). Written to
    ``path.tmp``, flushed to disk, then renamed. Returns the file's sha256."""
    header, sizes = _header(((name, dtype, shape) for name, (dtype, shape) in shapes.items()),
                            metadata)
    digest = hashlib.sha256(header)
    partial = path.with_name(path.name + ".tmp")
    with partial.open("wb") as handle:
        handle.write(header)
        for name, nbytes in sizes:
            value = tensor(name)
            dtype, shape = shapes[name]
            if value.dtype != dtype or tuple(value.shape) != tuple(shape):
                raise InvalidArgument(f"tensor {name} is {value.dtype} {tuple(value.shape)}; the "
                                      f"layout of {path.name} expects {dtype} {tuple(shape)}")
            data = tensor_bytes(value)
            assert len(data) == nbytes
            handle.write(data)
            digest.update(data)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(path)
    return digest.hexdigest()


# A safetensors header is JSON naming a few thousand tensors at most; a larger length field
# is corruption, refused before it is read into memory (safetensors' own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's header: tensor name -> ``{"dtype", "shape", "data_offsets"}``.

    Every entry is checked against the file's size before anything else is read: the header
    length, each tensor's shape times its dtype's element size against its offsets, and
    the offsets against the data actually in the file (a truncated file is refused naming
    the first tensor past its end). Refusals are :class:`CheckpointFormatError`.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointFormatError(f"{path.name}: {size} bytes, too short to be a "
                                        "safetensors file (truncated?)")
        length = struct.unpack("<Q", prefix)[0]
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointFormatError(f"{path.name}: the header claims {length} bytes, the "
                                        f"file holds {size} (truncated or not safetensors)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(f"{path.name}: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path.name}: the header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    for name, entry in header.items():
        _check_entry(path.name, name, entry, data_bytes)
    return header


# Bytes per element of every whole-byte safetensors dtype code (other tools' checkpoints
# hold FP8 and unsigned tensors this writer never stores).
_ELEMENT_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
                  "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                  "I64": 8, "U64": 8, "F64": 8}


def _check_entry(file: str, name: str, entry: object, data_bytes: int) -> None:
    """One header entry's dtype, shape and offsets against each other and the file."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointFormatError(f"{file}: tensor {name}: malformed header entry {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise CheckpointFormatError(f"{file}: tensor {name}: malformed shape {shape!r} or "
                                    f"offsets {offsets!r}")
    if dtype not in _ELEMENT_BYTES:  # sub-byte or newer codes: the offsets checks only
        nbytes = offsets[1] - offsets[0]
    else:
        nbytes = _ELEMENT_BYTES[dtype]
        for dim in shape:
            nbytes *= dim
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointFormatError(
            f"{file}: tensor {name}: shape {shape} of {dtype} needs {nbytes} bytes, its "
            f"offsets span {offsets[1] - offsets[0]}")
    if offsets[1] > data_bytes:
        raise CheckpointFormatError(
            f"{file}: tensor {name} ends at byte {offsets[1]} of the data, the file holds "
            f"{data_bytes} (truncated file)")


def dtype_of(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``"F32"``)."""
    return next(d for d, name in _DTYPE_NAMES.items() if name == code)


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, read into its own memory (no mapping: the pages of
    a memory-mapped file stay in the resident set while it is open, which while a shard is
    assembled from its staging files would be the whole shard). The bytes go straight into
    the tensor's storage (one copy; a block is hundreds of MB)."""
    with path.open("rb", buffering=0) as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        entry = json.loads(handle.read(length))[name]
        start, end = entry["data_offsets"]
        # on the CPU whatever the default device (transformers loads under a meta one)
        tensor = torch.empty(entry["shape"], dtype=dtype_of(entry["dtype"]), device="cpu")
        if end == start:
            return tensor
        handle.seek(8 + length + start)
        view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        filled = 0
        while filled < end - start:
            count = handle.readinto(view[filled:])
            if not count:
                raise CheckpointFormatError(f"{path.name}: tensor {name} ends past the end of "
                                            "the file (truncated file)")
            filled += count
    return tensor


def bytes_sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def first_differing_tensor(path: Path, digests: Mapping[str, str]) -> str | None:
    """The first of ``digests``' tensors whose bytes in the safetensors file ``path`` do not
    hash to the recorded sha256 (or that the header does not name), or None when all do."""
    header = read_header(path)
    with path.open("rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        for name, digest in digests.items():
            if name not in header:
                return name
            start, end = header[name]["data_offsets"]
            handle.seek(8 + length + start)
            if bytes_sha256(memoryview(handle.read(end - start))) != digest:
                return name
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class CheckpointLayout:
    """Which file holds which tensor of the model, and the index beside them.

    ``sources``: stored name -> the model's state-dict name it comes from (a renamed or
    tied tensor is stored once, under the name transformers writes).
    """

    files: dict[str, list[str]]  # file name -> stored names, in state-dict order
    sources: dict[str, str]
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # stored name -> (dtype, shape)
    total_parameters: int

    @property
    def is_sharded(self) -> bool:
        return len(self.files) > 1

    def file_of(self) -> dict[str, str]:
        return {name: file for file, names in self.files.items() for name in names}


def checkpoint_layout(model: nn.Module, max_shard_size: int) -> CheckpointLayout:
    """The layout transformers' ``save_pretrained`` gives ``model``'s state dict, from its
    structure alone (the weights may be on the meta device)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(state), model)
    # Mark each tensor by its name so the reverted (renamed) dict says where it came from.
    marked = {name: torch.empty(0).as_strided((0,), (1,)) for name in kept}
    for name, marker in marked.items():
        marker.obs_compress_source = name  # type: ignore[attr-defined]
    reverted = revert_weight_conversion(model, marked)
    sources = {}
    for stored, marker in reverted.items():
        source = getattr(marker, "obs_compress_source", None)
        if source is None:
            raise InvalidArgument(
                f"{type(model).__name__} stores {stored} combined from several tensors of the "
                "model (a transformers weight conversion); such models are not supported yet")
        sources[stored] = source
    # In the model's state-dict order whatever order the reverting returned (it sorts by
    # name for a model loaded by from_pretrained, not for one built from its config): blocks
    # in order, so a streaming run completes its shards one after another.
    position = {name: index for index, name in enumerate(kept)}
    sources = dict(sorted(sources.items(), key=lambda item: position[item[1]]))
    shapes = {stored: (kept[source].dtype, tuple(kept[source].shape))
              for stored, source in sources.items()}
    sized = {stored: torch.empty(shape, dtype=dtype, device="meta")
             for stored, (dtype, shape) in shapes.items()}
    split = split_torch_state_dict_into_shards(
        sized, filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size)
    order = list(sources)
    files = {file: sorted(names, key=order.index)
             for file, names in split.filename_to_tensors.items()}
    total = sum(p.numel() for p in model.parameters())
    return CheckpointLayout(files=files, sources=sources, shapes=shapes, total_parameters=total)


# --------------------------------------------------------------------------- writer


class ShardWriter:
    """Write a :class:`CheckpointLayout`'s files into ``folder`` as their tensors arrive.

    :meth:`add` takes model tensors by their state-dict names; a shard whose tensors are all
    in is written at once; a shard of tensors stored as they are is otherwise filled in
    place (``<file>.partial``); a shard with a compressed weight keeps its tensors in one
    staging file per call (named by ``label``) until it is complete. ``written``,
    ``filling`` and ``staged`` say what is on disk (for the progress manifest); ``restore``
    takes them back after a crash. ``encodings``: stored weight name -> how a
    compressed format encodes it (:func:`.encoding.plan_encodings`); the layout (which file
    holds which weight) stays the dense one, so it does not depend on the weights' values.
    """

    def __init__(self, folder: Path, layout: CheckpointLayout,
                 encodings: Mapping[str, WeightEncoding] | None = None):
        self.folder = folder
        self.layout = layout
        self.encodings = dict(encodings or {})
        self._file_of = layout.file_of()
        self._by_source: dict[str, list[str]] = {}
        for stored, source in layout.sources.items():
            self._by_source.setdefault(source, []).append(stored)
        # each stored file tensor -> the layout's (dense) name it belongs to
        self._weight_of: dict[str, str] = {name: name for name in self._file_of}
        self._parts_of: dict[str, list[str]] = {name: [name] for name in self._file_of}
        for weight, encoding in self.encodings.items():
            parts = list(stored_names(weight, encoding.format).values())
            self._parts_of[weight] = parts
            for part in parts:
                self._weight_of[part] = weight
        self._staged_headers: dict[str, dict[str, dict]] = {}
        self.staged: dict[str, dict] = {}  # staging file -> {"names": [...], "sha256": ...}
        self.written: dict[str, str] = {}  # shard file -> sha256
        # shard file being filled in place -> {stored name: sha256 of its bytes}, for the
        # tensors flushed to ``<file>.partial``
        self.filling: dict[str, dict[str, str]] = {}
        self._in_place_headers: dict[str, tuple[bytes, dict[str, int], int]] = {}

    def in_place(self, file: str) -> bool:
        """Whether ``file`` can be filled in place: its header is known before its tensors
        are, since none is a compressed weight (whose stored size depends on its mask)."""
        return not any(weight in self.encodings for weight in self.layout.files[file])

    def _stored_names(self) -> dict[str, str]:
        """stored name -> staging file, for every staged tensor."""
        return {name: part for part, record in self.staged.items() for name in record["names"]}

    def add(self, tensors: Mapping[str, torch.Tensor], label: str) -> list[str]:
        """Add model tensors (state-dict names; a name the layout does not store, a tied
        copy, is skipped). Returns the staging files no longer needed (every tensor of
        theirs is in a written shard): the caller deletes them once its record says so."""
        ready: dict[str, torch.Tensor] = {}
        for source, tensor in tensors.items():
            for stored in self._by_source.get(source, []):
                for name, value in tensors_for_file(stored, tensor,
                                                    self.encodings.get(stored)).items():
                    ready[name] = value
        staged = self._stored_names()
        ready_weights = {self._weight_of[n] for n in ready}
        staged_weights = {self._weight_of[n] for n in staged}
        for file, names in self.layout.files.items():
            if file in self.written or not any(n in ready_weights for n in names):
                continue
            if all(n in ready_weights for n in names) and file not in self.filling:
                self._write_shard(file, ready, staged)  # whole, in one go
            elif self.in_place(file):
                self._fill(file, {n: v for n, v in ready.items()
                                  if self._file_of[self._weight_of[n]] == file})
            elif all(n in ready_weights or n in staged_weights for n in names):
                self._write_shard(file, ready, staged)
        leftover = {name: value for name, value in ready.items()
                    if self._file_of[self._weight_of[name]] not in self.written
                    and self._file_of[self._weight_of[name]] not in self.filling}
        if leftover:
            (self.folder / STAGING_DIR).mkdir(exist_ok=True)
            part = f"{STAGING_DIR}/part-{label}.safetensors"
            digest = write_safetensors(self.folder / part,
                                       {n: (v.dtype, tuple(v.shape)) for n, v in leftover.items()},
                                       leftover.__getitem__)
            self.staged[part] = {"names": sorted(leftover), "sha256": digest}
        done = [part for part, record in self.staged.items()
                if all(self._file_of[self._weight_of[n]] in self.written
                       for n in record["names"])]
        for part in done:
            del self.staged[part]
            self._staged_headers.pop(part, None)
        return done

    def _shape(self, name: str, ready: Mapping[str, torch.Tensor],
               staged: Mapping[str, str]) -> tuple[torch.dtype, tuple[int, ...]]:
        """A stored tensor's dtype and shape: the layout's for a tensor stored as it is, the
        encoded tensor's own (its size depends on the mask) for a compressed weight's."""
        if name in self.layout.shapes:
            return self.layout.shapes[name]
        if name in ready:
            return ready[name].dtype, tuple(ready[name].shape)
        part = staged[name]
        if part not in self._staged_headers:
            self._staged_headers[part] = read_header(self.folder / part)
        entry = self._staged_headers[part][name]
        return dtype_of(entry["dtype"]), tuple(entry["shape"])

    def _write_shard(self, file: str, ready: Mapping[str, torch.Tensor],
                     staged: Mapping[str, str]) -> None:
        def fetch(name: str) -> torch.Tensor:
            if name in ready:
                return ready[name]
            return read_tensor(self.folder / staged[name], name)

        shapes = {name: self._shape(name, ready, staged)
                  for weight in self.layout.files[file] for name in self._parts_of[weight]}
        self.written[file] = write_safetensors(self.folder / file, shapes, fetch)

    def _fill(self, file: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write ``tensors`` (stored names, all of ``file``) at their offsets in
        ``<file>.partial``, created at its full size on first use, and flush them to disk
        before recording them; rename the file once every tensor of it is in (its sha256 is
        then read back, for the progress record)."""
        names = self.layout.files[file]
        if file not in self._in_place_headers:  # from the layout: the same on every call
            header, sizes = _header(((n, *self.layout.shapes[n]) for n in names), FILE_METADATA)
            self._in_place_headers[file] = (header, _data_offsets(sizes),
                                            len(header) + sum(nbytes for _, nbytes in sizes))
        header, offsets, file_bytes = self._in_place_headers[file]
        path = self.folder / (file + PARTIAL_SUFFIX)
        if file not in self.filling:
            with path.open("wb") as handle:
                handle.write(header)
                handle.truncate(file_bytes)
            self.filling[file] = {}
        digests = {}
        with path.open("r+b") as handle:
            for name, value in tensors.items():
                dtype, shape = self.layout.shapes[name]
                if value.dtype != dtype or tuple(value.shape) != tuple(shape):
                    raise InvalidArgument(f"tensor {name} is {value.dtype} {tuple(value.shape)};"
                                          f" the layout of {file} expects {dtype} {tuple(shape)}")
                data = tensor_bytes(value)
                handle.seek(len(header) + offsets[name])
                handle.write(data)
                digests[name] = bytes_sha256(data)
            handle.flush()
            os.fsync(handle.fileno())
        self.filling[file].update(digests)
        if len(self.filling[file]) == len(names):
            path.replace(self.folder / file)
            del self.filling[file]
            self.written[file] = file_sha256(self.folder / file)

    def missing(self) -> list[str]:
        present = ({self._weight_of[n] for n in self._stored_names()}
                   | {n for digests in self.filling.values() for n in digests})
        return [name for file, names in self.layout.files.items() if file not in self.written
                for name in names if name not in present]

    def index(self) -> dict:
        """``model.safetensors.index.json``: every stored tensor's file, from the written
        shards' headers (a compressed weight's stored tensors are named, not the weight)."""
        weight_map, total = {}, 0
        for file in self.layout.files:
            for name, entry in read_header(self.folder / file).items():
                weight_map[name] = file
                start, end = entry["data_offsets"]
                total += end - start
        return {"metadata": {"total_parameters": self.layout.total_parameters,
                             "total_size": total},
                "weight_map": dict(sorted(weight_map.items()))}

    def finish(self) -> None:
        """Check every shard is written and write the index of a sharded checkpoint."""
        unwritten = [file for file in self.layout.files if file not in self.written]
        if unwritten:
            raise InvalidArgument(f"the checkpoint is incomplete: {', '.join(unwritten)} never "
                                  f"received {', '.join(self.missing()[:5])}")
        if self.layout.is_sharded:
            (self.folder / INDEX_NAME).write_text(
                json.dumps(self.index(), indent=2, sort_keys=True) + "\n",
                encoding="utf-8")

    def restore(self, staged: Mapping[str, dict], written: Mapping[str, str],
                filling: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.staged = {part: dict(record) for part, record in staged.items()}
        self.written = dict(written)
        self.filling = {file: dict(digests) for file, digests in (filling or {}).items()}


def write_state_dict(folder: Path, model: nn.Module, max_shard_size: int,
                     encodings: Mapping[str, WeightEncoding] | None = None,
                     layout: CheckpointLayout | None = None) -> None:
    """The in-memory path: every tensor of ``model`` through one :class:`ShardWriter`
    (``layout``: :func:`checkpoint_layout`'s, when the caller has it already)."""
    writer = ShardWriter(folder, layout or checkpoint_layout(model, max_shard_size), encodings)
    writer.add(model.state_dict(), label="all")
    writer.finish()


def write_model_config(folder: Path, model: nn.Module) -> None:
    """``config.json`` (with the model's dtype and class) and the generation config, as
    transformers' ``save_pretrained`` writes them."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    is_remote_code = getattr(model, "is_remote_code", None)
    if callable(is_remote_code) and is_remote_code():
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate() and getattr(model, "generation_config", None):
        model.generation_config.save_pretrained(folder)


__all__ = ["CheckpointLayout", "INDEX_NAME", "PARTIAL_SUFFIX", "ShardWriter", "WEIGHTS_NAME",
           "bytes_sha256", "checkpoint_layout", "dtype_of", "file_sha256",
           "first_differing_tensor", "read_header", "read_tensor", "tensor_bytes",
           "tensors_for_file", "write_model_config", "write_safetensors", "write_state_dict"]
