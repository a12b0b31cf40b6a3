"""The streaming prune: a checkpoint folder pruned one block at a time, resumable.

The default of :func:`obs_compress.api.prune_checkpoint` for a local folder of safetensors.
The model is built on the meta device (:mod:`obs_compress.model.streaming`); the one layer
loop (:func:`obs_compress.driver.prune_blocks`) reads each block's weights from disk just
before it works on it; each pruned block goes to the one writer
(:class:`obs_compress.export.shards.ShardWriter`) and its memory is freed. Peak memory is
one block, the tensors outside the blocks (embeddings, head) and the calibration
activations. The files equal the in-memory path's byte for byte.

After every block, the in-progress folder's manifest (:mod:`obs_compress.export.progress`)
records what is written and stores the hidden states entering the next block
(``inputs-<block>.safetensors``: ``n_samples x seq_len x hidden`` in the model's dtype), so
``resume=True`` continues at the first unfinished block without re-running the earlier
ones; the block-0 capture (embeddings only) is run again for the other block arguments.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import torch

from . import THP_ALLOCATION
from .distributed import ProcessGroup
from .driver import prune_blocks
from .errors import InvalidArgument
from .export.checkpoint import (_tool_version, check_output_dir, check_shard_size,
                                commit_folder, resolve_nm_pattern, write_side_files)
from .export.encoding import plan_encodings
from .export.progress import MANIFEST_NAME, open_progress, write_manifest
from .export.shards import STAGING_DIR, ShardWriter, checkpoint_layout, write_safetensors
from .memory_plan import ActivationChoice, activation_bytes, choose_activations
from .model.loading import _check_local_folder, _model_class
from .model.streaming import StreamingModel, open_streaming_model
from .plan import build_plan
from .report import LayerStats, PruneReport

logger = logging.getLogger(__name__)

INPUTS_PATTERN = "inputs-{:05d}.safetensors"


def streaming_refusal(folder: Path | None, recipe: Any, calibration: Any,
                      evaluate: Any) -> str | None:
    """Why this run cannot stream (it then loads the whole model), or None when it can."""
    if folder is None:
        return "the model is not a local folder"
    if not any(folder.glob("*.safetensors")):
        return "the folder holds no safetensors files"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    section = config.get("quantization_config")
    if section:
        from .export import formats

        if isinstance(section, dict) and section.get(formats.QUANT_METHOD_KEY) == formats.QUANT_METHOD:
            return ("the checkpoint is stored compressed (obs_sparse); it is decoded as the "
                    "whole model loads")
        return "the checkpoint is quantized"
    if recipe.curvature.kind == "kronecker" and recipe.curvature.loss != "block_reconstruction":
        return f"curvature.loss {recipe.curvature.loss} back-propagates through the whole model"
    if recipe.block_sparsity.method == "owl":
        return "block_sparsity owl runs a dense pass over every block first"
    if recipe.structured.active:
        return "structured removal shrinks the widths of the whole model at the end"
    if getattr(calibration, "source", None) == "self":
        return "--dataset self generates text with the whole model"
    if evaluate:
        return "--eval measures perplexity with the whole model"
    return None


def release_freed_memory() -> None:
    """Hand the heap the finished block freed back to the OS (glibc's ``malloc_trim``):
    freed heap below the mmap threshold is otherwise kept for reuse, so a streaming run's
    resident set would grow by what one block's work fragmented. A no-op where the C library
    has none (musl, macOS)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _record_writer(record: Any, writer: ShardWriter) -> None:
    """What the writer has on disk, into the progress record (copies: the writer goes on)."""
    record.shards, record.staged = dict(writer.written), dict(writer.staged)
    record.filling = {file: dict(digests) for file, digests in writer.filling.items()}


def _block_loader(streaming: StreamingModel):
    """The driver's ``block_loader``: it runs after the first block's inputs are captured,
    so the embeddings and head (written at the start on rank 0) are released then, never
    read again; then the block's tensors are read."""
    def load_block(block_plan) -> None:
        streaming.release_outside_()
        streaming.load_block_(block_plan.index, [p.layer.name for p in block_plan.layers])

    return load_block


def model_identity(folder: Path) -> dict[str, Any]:
    """The source checkpoint, cheaply: config.json's sha256 and each safetensors file's
    size and header sha256 (the header names every tensor with its dtype, shape, offsets)."""
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            length = struct.unpack("<Q", handle.read(8))[0]
            header = handle.read(length)
        files[path.name] = f"{path.stat().st_size} {hashlib.sha256(header).hexdigest()}"
    config = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    return {"config.json": config, **files}


def _save_inputs(folder: Path, block: int, outputs: list[torch.Tensor]) -> dict[str, str]:
    name = INPUTS_PATTERN.format(block)
    tensors = {f"batch.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(outputs)}
    digest = write_safetensors(folder / name, {k: (v.dtype, tuple(v.shape))
                                               for k, v in tensors.items()},
                               tensors.__getitem__, metadata=None)
    return {"file": name, "sha256": digest}


def _load_inputs(folder: Path, record: dict[str, str]) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / record["file"]))
    return [tensors[f"batch.{i}"] for i in range(len(tensors))]


def _layer_stats(data: dict[str, Any]) -> LayerStats:
    """A recorded :class:`LayerStats` back (``dampening_raised`` is derived, not stored)."""
    fields = {key: value for key, value in data.items() if key != "dampening_raised"}
    return LayerStats(**{**fields, "shape": tuple(fields["shape"])})


def _prune_as_follower(model: Any, plan: Any, input_ids: torch.Tensor | None,
                       streaming: StreamingModel, group: ProcessGroup, *, recipe: Any,
                       folder: Path, out: Path, tokenizer: Any, device: torch.device | None,
                       batch_size: int, n_blocks: int, start: float,
                       choice: ActivationChoice | None,
                       ) -> tuple[PruneReport, Path, StreamingModel, Any]:
    """A rank other than 0: the same blocks pruned with the others, nothing written; returns
    once rank 0 has committed the output folder (or fails when it died)."""
    layers: list[LayerStats] = []
    for result in prune_blocks(model, plan, input_ids, device=device, batch_size=batch_size,
                               progress=False, block_loader=_block_loader(streaming),
                               group=group,
                               activations=choice.placement if choice else "device"):
        streaming.release_block_(result.index)
        result.outputs = None
        layers.extend(result.layers)
    group.barrier("rank 0 to write and commit the output folder")
    streaming.close()
    n_samples, seq_len = input_ids.shape if input_ids is not None else (0, 0)
    return (PruneReport(layers=layers, n_blocks=n_blocks, n_samples=n_samples, seq_len=seq_len,
                        seconds=time.perf_counter() - start, recipe=recipe.to_dict(),
                        model=str(folder), path="streaming", world_size=group.world_size,
                        activations=choice.describe() if choice else "none"),
            out, streaming, tokenizer)


def prune_streaming(folder: Path, recipe: Any, out_dir: str | os.PathLike, *, calibration: Any,
                    device: torch.device | None, overwrite: bool, resume: bool,
                    trust_remote_code: bool, dtype: Any, batch_size: int, progress: bool,
                    max_shard_size: int | str, data_dir: Any, format: str = "dense",
                    pattern: Any = None, group: ProcessGroup | None = None,
                    activations: str = "auto") -> tuple[PruneReport, Path, StreamingModel, Any]:
    """Prune the checkpoint in ``folder`` block by block into ``out_dir`` (see the module
    docstring). Returns the report, the output folder, the (meta) model and tokenizer.

    ``group``: a multi-process run (:mod:`obs_compress.distributed`). Every rank reads the
    blocks and prunes with the others; only rank 0 opens the in-progress folder, writes and
    commits, and the others wait for its commit before they return. The next block's
    inputs are split over the ranks, so such a run stores none and cannot be resumed.
    ``activations``: where the calibration activations are held
    (:func:`~obs_compress.memory_plan.choose_activations`; ``disk``: a memory-mapped file in
    the in-progress folder, or in the system's temporary folder on the other ranks)."""
    from transformers import AutoConfig, AutoTokenizer

    from .api import _check_vocabulary

    start = time.perf_counter()
    logger.info("huge pages for torch's allocations of 2 MiB and more: %s", THP_ALLOCATION)
    if group is not None and resume:
        raise InvalidArgument(f"--resume continues a single-process run; this one has "
                              f"{group.world_size} processes, whose next-block inputs are "
                              "split over the ranks and not stored")
    out = check_output_dir(out_dir, overwrite=overwrite, source=folder)
    shard_bytes = check_shard_size(max_shard_size)
    _check_local_folder(folder, allow_pickle=False)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    streaming = open_streaming_model(folder, _model_class(config, trust_remote_code), config,
                                     dtype=dtype)
    model = streaming.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder),
                                                  trust_remote_code=trust_remote_code)
    except Exception as exc:  # a model without tokenizer files still prunes from ids
        logger.warning("no tokenizer loaded for %s (%s: %s)", folder, type(exc).__name__, exc)
        tokenizer = None
    plan = build_plan(model, recipe)
    input_ids = None
    if not calibration.is_none:
        input_ids = calibration.input_ids(tokenizer=tokenizer, model=None, data_dir=data_dir)
        _check_vocabulary(model, input_ids)
    layout = checkpoint_layout(model, shard_bytes)
    targets = [p.layer.name for block in plan.blocks for p in block.layers]
    nm = resolve_nm_pattern(format, {p.settings.pattern for block in plan.blocks
                                     for p in block.layers}, recipe.pattern, pattern)
    encodings = plan_encodings(model, layout.sources, format, targets, nm)
    n_blocks = len(plan.blocks)
    identity = {
        "tool": _tool_version(), "model": model_identity(folder), "recipe": recipe.to_dict(),
        "calibration": (hashlib.sha256(input_ids.numpy().tobytes()).hexdigest() + " "
                        + "x".join(map(str, input_ids.shape))) if input_ids is not None else None,
        "settings": {"dtype": str(next(p.dtype for p in model.parameters())),
                     "batch_size": batch_size, "max_shard_size": shard_bytes,
                     "format": format, "pattern": str(nm) if nm else None,
                     "device": device.type if device is not None else "cpu",
                     "world_size": group.world_size if group is not None else 1},
    }
    n_samples, seq_len = input_ids.shape if input_ids is not None else (0, 0)
    choice = None
    if input_ids is not None:
        held = (group.local_samples(input_ids) if group is not None else input_ids).shape[0]
        choice = choose_activations(activations, activation_bytes(
            config, held, seq_len, next(p.dtype for p in model.parameters())),
            str(device) if device is not None and device.type != "cpu" else "cpu")
        logger.info("calibration activations: %s", choice.describe())
    if group is not None:
        group.check_same("model, recipe, calibration and settings", identity)
        if not group.is_writer:
            return _prune_as_follower(model, plan, input_ids, streaming, group, recipe=recipe,
                                      folder=folder, out=out, tokenizer=tokenizer,
                                      device=device, batch_size=batch_size, n_blocks=n_blocks,
                                      start=start, choice=choice)
    work, record = open_progress(out, identity, n_blocks, resume=resume, overwrite=overwrite)
    writer = ShardWriter(work, layout, encodings)
    writer.restore(record.staged, record.shards, record.filling)
    resumed_at = record.blocks_done if record.blocks_done else None
    if record.blocks_done == 0 and not (record.shards or record.staged or record.filling):
        writer.add(streaming.outside_state(), label="outside")
        # Mapped afresh: the pages the writer just read would otherwise stay resident to the
        # end (the head alone is vocab x hidden); the capture touches only the rows it embeds.
        streaming.load_outside_blocks_()
        _record_writer(record, writer)
        write_manifest(work, record)
    start_inputs = _load_inputs(work, record.inputs) if record.inputs is not None else None
    if record.blocks_done and input_ids is not None and start_inputs is None:
        raise RuntimeError("progress record without stored inputs")  # written together

    seconds_before = record.seconds
    run_start = time.perf_counter()
    layers = [_layer_stats(data) for data in record.layers]
    for result in prune_blocks(model, plan, input_ids, device=device, batch_size=batch_size,
                               progress=progress, block_loader=_block_loader(streaming),
                               start_block=record.blocks_done, start_inputs=start_inputs,
                               group=group, activations=choice.placement if choice else "device",
                               activations_dir=work):
        consumed = writer.add(streaming.block_state(result.index),
                              label=f"block-{result.index:05d}")
        streaming.release_block_(result.index)
        old_inputs = record.inputs
        if result.outputs is not None and result.index + 1 < n_blocks and group is None:
            stored = time.perf_counter()
            record.inputs = _save_inputs(work, result.index + 1, result.outputs)
            logger.info("stored the inputs of block %d (%.1f MB) in %.2f s, for a resume",
                        result.index + 1, sum(t.numel() * t.element_size()
                                              for t in result.outputs) / 1e6,
                        time.perf_counter() - stored)
        result.outputs = None
        layers.extend(result.layers)
        record.blocks_done = result.index + 1
        _record_writer(record, writer)
        record.layers = [s.to_dict() for s in layers]
        record.seconds = seconds_before + time.perf_counter() - run_start
        write_manifest(work, record)
        for part in consumed:  # only once the record no longer names them
            (work / part).unlink(missing_ok=True)
        if old_inputs is not None and old_inputs != record.inputs:
            (work / old_inputs["file"]).unlink(missing_ok=True)
        release_freed_memory()
    writer.finish()
    report = PruneReport(layers=layers, n_blocks=n_blocks, n_samples=n_samples, seq_len=seq_len,
                         seconds=seconds_before + time.perf_counter() - run_start,
                         recipe=recipe.to_dict(), model=str(folder), path="streaming",
                         resumed_at_block=resumed_at,
                         world_size=group.world_size if group is not None else 1,
                         activations=choice.describe() if choice else "none")
    write_side_files(work, model, tokenizer=tokenizer, source=folder, recipe=recipe,
                     report=report, encodings=encodings)
    if record.inputs is not None:
        (work / record.inputs["file"]).unlink(missing_ok=True)
    shutil.rmtree(work / STAGING_DIR, ignore_errors=True)
    (work / MANIFEST_NAME).unlink()
    commit_folder(work, out, overwrite=overwrite, source=folder)
    if group is not None:
        group.barrier("every rank to finish")
    streaming.close()
    logger.info("wrote %s (streaming, %.1f s)", out, time.perf_counter() - start)
    return report, out, streaming, tokenizer


__all__ = ["model_identity", "prune_streaming", "streaming_refusal"]
