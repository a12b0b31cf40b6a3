"""Read any of our folders tensor by tensor, and convert a folder to another weight format.

:func:`read_stored_tensors` reads a safetensors checkpoint (dense, or ``bitmask``/``nm`` of
docs/FORMAT.md) one file at a time and yields each tensor of the model by its stored weight
name, a compressed weight decoded (:mod:`.formats`, every count checked against the file's
size before anything is allocated). Nothing is unpickled.

:func:`convert_checkpoint` (``obs-compress convert IN OUT --format ...``) rewrites a folder
in another format through the one writer (:class:`.shards.ShardWriter`, dense layout from
the model built on the meta device) into the one atomic output folder: ``IN`` is never
written, ``OUT`` appears complete or not at all. The side files are carried over as
``prune`` carries them, the recipe and report of the source kept, and the model card says
the conversion. Which weights get encoded: the targets the source's ``sparsity`` section
names, else every block-stack layer whose weight holds a zero.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from ..errors import CheckpointFormatError, ModelLoadError
from ..math.masks import parse_pattern
from . import formats
from .checkpoint import (CONFIG_NAME, RECIPE_NAME, REPORT_NAME, SPARSITY_KEY, _tool_version,
                         atomic_output_dir, check_shard_size, resolve_nm_pattern,
                         write_side_files)
from .encoding import decode_weight, encoded_weights, plan_encodings
from .shards import ShardWriter, checkpoint_layout

logger = logging.getLogger(__name__)


def read_file_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor, str, int]]:
    """``(weight name, dense tensor, format it was stored in, stored bytes)`` for every
    tensor of one safetensors file, a compressed weight decoded."""
    from safetensors import safe_open

    from .shards import read_header

    size = path.stat().st_size
    entries = read_header(path)
    nbytes = {name: e["data_offsets"][1] - e["data_offsets"][0] for name, e in entries.items()}
    plain, encoded = _split_stored_names(entries)
    with safe_open(str(path), framework="pt") as handle:
        for name in plain:
            yield name, handle.get_tensor(name), "dense", nbytes[name]
        for weight, format in sorted(encoded.items()):
            names_of = list(formats.stored_names(weight, format).values())
            stored = {name: handle.get_tensor(name) for name in names_of}
            yield (weight, decode_weight(weight, format, stored, file_size=size), format,
                   sum(nbytes[name] for name in names_of))


def _split_stored_names(names) -> tuple[list[str], dict[str, str]]:
    """A file's stored tensor names split into those stored as they are and the compressed
    weights (weight name -> format) whose stored tensors make up the rest."""
    encoded = encoded_weights(names)
    parts = {name for weight, format in encoded.items()
             for name in formats.stored_names(weight, format).values()}
    return [name for name in names if name not in parts], encoded


def _weight_names(folder: Path) -> set[str]:
    """Every weight name a checkpoint stores, from its files' headers alone (no tensor read)."""
    from .shards import read_header

    names = set()
    for path in sorted(folder.glob("*.safetensors")):
        plain, encoded = _split_stored_names(read_header(path))
        names.update(plain, encoded)
    return names


def check_compressed_files(files: Iterable[Path], format: str, targets: Iterable[str],
                           expected: Mapping[str, tuple[int, ...]]) -> dict[str, Path]:
    """Check a compressed checkpoint's files against its ``quantization_config`` and the
    model before any weight is read; returns target weight -> the file holding it.

    ``targets``: the stored weight names the section says are encoded in ``format``;
    ``expected``: stored name -> the shape the model built from the config needs. From the
    headers (each validated against its file's size by :func:`.shards.read_header`) and the
    16-byte ``shape``/``pattern`` tensors alone: every target has all of its stored tensors,
    in one file, of the dtypes and shapes its ``shape`` needs, and that shape is the model's;
    no stored tensor belongs to a weight that is not a target or that the model lacks; no
    weight is stored both dense and compressed. Refusals are :class:`CheckpointFormatError`
    naming the tensor.
    """
    from .shards import dtype_of, read_header, read_tensor

    if formats.check_format(format) == "dense":
        raise CheckpointFormatError("a quantization_config section names format 'dense'; "
                                    "dense folders carry no such section")
    suffixes = set(formats.stored_names("w", format))
    file_of: dict[str, Path] = {}
    headers: dict[Path, dict[str, dict]] = {}
    for path in files:
        headers[path] = read_header(path)
        for name in headers[path]:
            if name in file_of:
                raise CheckpointFormatError(f"{name} is stored in both {file_of[name].name} "
                                            f"and {path.name}")
            file_of[name] = path
    targets = set(targets)
    # Every stored tensor named like a part of a compressed weight must be one of a target.
    for name in file_of:
        weight, _, suffix = name.rpartition(".")
        if suffix in suffixes and name not in expected and weight not in targets:
            raise CheckpointFormatError(
                f"{name}: a stored {format} tensor of {weight}, which config.json's "
                f"quantization_config does not list among its targets")
    located = {}
    for weight in sorted(targets):
        names = formats.stored_names(weight, format)
        missing = [n for n in names.values() if n not in file_of]
        if missing:
            raise CheckpointFormatError(f"{weight}: its stored tensors {', '.join(missing)} are "
                                        "missing from the checkpoint")
        if weight not in expected:
            raise CheckpointFormatError(f"{weight}: stored in {format}, but the model built "
                                        "from config.json has no such weight")
        if weight in file_of:
            raise CheckpointFormatError(f"{weight} is stored both dense and in {format}")
        path = file_of[names["shape"]]
        if any(file_of[n] != path for n in names.values()):
            raise CheckpointFormatError(f"{weight}: its stored tensors are split over files; "
                                        "docs/FORMAT.md keeps them in one")
        header = headers[path]
        layout = {suffix: (dtype_of(header[n]["dtype"]), tuple(header[n]["shape"]))
                  for suffix, n in names.items()}
        # a ``shape`` tensor of the wrong kind is refused by check_layout from its meta twin
        shape = read_tensor(path, names["shape"]) if layout["shape"] == (torch.int64, (2,)) \
            else torch.empty(layout["shape"][1], dtype=layout["shape"][0], device="meta")
        pattern = None
        if format == "nm" and layout["pattern"][0] == torch.int64 \
                and layout["pattern"][1] in ((2,), (3,)):
            pattern = read_tensor(path, names["pattern"])
        dims = formats.check_layout(format, weight, layout, shape, pattern)
        if tuple(expected[weight]) != dims:
            raise CheckpointFormatError(f"{weight}: stored shape {dims}, the model built from "
                                        f"config.json needs {tuple(expected[weight])}")
        located[weight] = path
    return located


def read_stored_tensors(folder: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor, str]]:
    """``(weight name, dense tensor, format it was stored in)`` for every tensor of the
    checkpoint, file by file (one file's tensors open at a time)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"checkpoint {str(folder)!r} holds no *.safetensors files")
    for path in files:
        for name, tensor, format, _ in read_file_tensors(path):
            yield name, tensor, format


def _source_format(config: dict) -> str:
    section = config.get(formats.QUANTIZATION_CONFIG_KEY)
    if not section:
        return "dense"
    if section.get(formats.QUANT_METHOD_KEY) != formats.QUANT_METHOD:
        raise ModelLoadError(f"the checkpoint is quantized ({section.get('quant_method')}); "
                             "convert reads dense and obs_sparse folders only")
    return formats.check_format(section.get(formats.FORMAT_KEY))


def convert_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, format: str, *,
                       pattern: str | None = None, overwrite: bool = False,
                       max_shard_size: int | str = "2GB") -> Path:
    """Write the checkpoint in ``source`` to ``out_dir`` in ``format`` (see the module).
    ``pattern``: the N:M pattern for ``nm`` when the source's sparsity section does not
    record one. Returns the output folder."""
    from transformers import AutoConfig

    from ..model.blocks import find_block_stack, find_layers
    from ..model.loading import _model_class
    from ..model.streaming import parameters_on_meta, resolve_dtype, safetensors_files

    formats.check_format(format)
    folder = Path(source).expanduser().resolve()
    if not (folder / CONFIG_NAME).is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder")
    shard_bytes = check_shard_size(max_shard_size)
    data = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    source_format = _source_format(data)
    section = data.get(SPARSITY_KEY)
    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours: the weights are decoded here
    dtype = resolve_dtype(config, None, folder, safetensors_files(folder))
    with parameters_on_meta():
        model = _model_class(config, False)._from_config(config, dtype=dtype)
    model.eval()
    layout = checkpoint_layout(model, shard_bytes)
    stack = find_block_stack(model)
    layer_of = {f"{layer.name}.weight": layer.name
                for index, block in enumerate(stack.modules)
                for layer in find_layers(block, stack.block_name(index))}

    present = _weight_names(folder)
    missing = [stored for stored in layout.sources if stored not in present]
    if missing:
        raise ModelLoadError(f"{folder} holds no tensor for {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
    # The encodings must be known before the writer starts. A folder of ours names its
    # targets; for any other, one pass over the files finds the layers holding zeros.
    targets = list(section.get("targets", [])) if isinstance(section, dict) else None
    zeros = total = 0
    if targets is None:
        found_targets = []
        for name, tensor, _ in read_stored_tensors(folder):
            layer = layer_of.get(layout.sources.get(name, ""))
            if layer is None:
                continue
            count = int((tensor == 0).sum())
            zeros += count
            total += tensor.numel()
            if count:
                found_targets.append(layer)
        targets = sorted(found_targets)
    recorded = (section or {}).get("patterns") or {}
    nm = resolve_nm_pattern(format, [p for p in recorded if p != "unstructured"] or [],
                            (section or {}).get("pattern"), pattern)
    if nm is None and pattern is not None:
        parse_pattern(pattern)  # an unreadable --pattern is refused for every format
    encodings = plan_encodings(model, layout.sources, format, targets, nm)
    if section is None:
        section = {"tool": f"obs_compress {_tool_version()}", "method": None, "pattern": None,
                   "sparsity": None, "global_sparsity": zeros / total if total else 0.0,
                   "patterns": {}, "overrides": [], "targets": targets}
    recipe = None
    if (folder / RECIPE_NAME).is_file():
        from ..recipe import load_recipe

        recipe = load_recipe(folder / RECIPE_NAME)
    report: Any = None
    if (folder / REPORT_NAME).is_file():
        report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))

    with atomic_output_dir(out_dir, overwrite=overwrite, source=folder) as partial:
        writer = ShardWriter(partial, layout, encodings)
        wanted = {stored: layout.file_of()[stored] for stored in layout.sources}
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor, _ in read_stored_tensors(folder):
            if name not in wanted:
                continue
            expected_dtype, dtype_shape = layout.shapes[name]
            if tuple(tensor.shape) != tuple(dtype_shape):
                raise CheckpointFormatError(
                    f"{name}: stored shape {tuple(tensor.shape)}, the model's config needs "
                    f"{tuple(dtype_shape)}")
            if tensor.dtype != expected_dtype:
                # a conversion changes the storage, never the values
                raise CheckpointFormatError(
                    f"{name}: stored as {tensor.dtype}, the model's config gives "
                    f"{expected_dtype}; convert keeps every value as stored")
            file = wanted[name]
            pending.setdefault(file, {})[layout.sources[name]] = tensor
            if len(pending[file]) == len(layout.files[file]):
                writer.add(pending.pop(file), label=f"file-{len(writer.written):05d}")
        writer.finish()
        note = (f"Converted by `obs-compress convert` from `{folder.name}` (format "
                f"`{source_format}`) to format `{format}`; the weights are unchanged.")
        write_side_files(partial, model, source=folder, recipe=recipe, report=report,
                         encodings=encodings, section=section, card_note=note)
    out = Path(out_dir).expanduser().resolve()
    logger.info("converted %s (%s) to %s (%s)", folder, source_format, out, format)
    return out


__all__ = ["check_compressed_files", "convert_checkpoint", "read_file_tensors", "read_stored_tensors"]
