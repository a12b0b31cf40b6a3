"""The memory plan of a prune, from the model's config and the recipe alone (``--dry-run``).

No weight is read: the model is built on the meta device (shapes only, every architecture
transformers builds), the recipe resolved against it by :func:`obs_compress.plan.build_plan`,
and each quantity the run holds at its peak counted from the shapes. What the driver holds
(:mod:`obs_compress.driver`), per item:

* weights: the whole model (in-memory path) or the tensors outside the block stack plus the
  largest block (streaming path, :mod:`obs_compress.stream`), in the model's dtype;
* calibration activations: the hidden states entering the current block, ``n_samples x
  seq_len x hidden`` in the model's dtype (1/N of it on each of N processes), where
  :func:`choose_activations` puts them (the compute device, CPU memory, or a memory-mapped
  file on disk), plus one batch's re-forward output on the device beside them;
* one batch's forward working set inside a block: ``batch x seq_len x intermediate`` for the
  MLP's three products and the eager attention scores ``batch x heads x seq_len²`` (fp32);
* Hessian accumulators: ``d_in²`` in fp32 per target layer of the block. Layers fed the same
  tensor (q/k/v, gate/up) share one in the run, so this counts an upper bound;
* the solve of the layer that needs most (:func:`obs_compress.algorithms.solve_bytes`, by its
  method and refit): the float64 work matrix of the prepared curvature (``8 d_in²`` bytes)
  with ``H^-1`` and ``U`` copied out, or those with the damped ``H``, the result and mask,
  the greedy OBS work and refit's conjugate-gradient work beside the solve, in fp32 (its
  ``H`` is counted with the accumulators);
* disk: the output (every tensor once, dense) and, streaming, the in-progress folder's stored
  block inputs (one activation tensor) for ``--resume``.

Shapes: a layer's ``W: (d_out, d_in)``; hidden states ``(n_samples, seq_len, hidden)``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .algorithms import solve_bytes
from .errors import InvalidArgument, ModelLoadError
from .model.blocks import find_block_stack
from .plan import build_plan

GIB = 1024 ** 3
FP32 = 4
# Resident memory of the CLI process with torch and transformers imported and nothing else
# loaded: 0.40 GiB measured (CPU build, torch 2.13, transformers 5.17); rounded up for the
# tokenizer and the calibration text.
RUNTIME_BYTES = int(0.5 * GIB)


ACTIVATIONS = ("auto", "device", "cpu", "disk")
# auto keeps the activations where they fit in this share of the free memory: the rest is
# for the block, its Hessians and the solve (and, on the CPU, the other processes).
ACTIVATIONS_FREE_SHARE = 0.5


@dataclass(frozen=True)
class ActivationChoice:
    placement: str  # "device", "cpu" or "disk"
    reason: str

    def describe(self) -> str:
        return f"{self.placement} ({self.reason})"


def available_cpu_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _free_device_bytes(device: str) -> int | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return None


def choose_activations(requested: str, n_bytes: int, device: str, *,
                       free_device: int | None = None,
                       free_cpu: int | None = None) -> ActivationChoice:
    """Where ``n_bytes`` of calibration activations are held (:data:`ACTIVATIONS`).

    ``auto``: on the compute device when they take at most :data:`ACTIVATIONS_FREE_SHARE`
    of its free memory (a CPU device: of ``MemAvailable``), else in CPU memory under the same
    rule, else on disk. ``free_device``/``free_cpu``: the free bytes (None: measured now)."""
    if requested not in ACTIVATIONS:
        raise InvalidArgument(f"activations {requested!r}: allowed are {', '.join(ACTIVATIONS)}")
    if requested != "auto":
        return ActivationChoice(requested, "asked for")
    free_cpu = available_cpu_bytes() if free_cpu is None else free_cpu
    size = f"{n_bytes / GIB:.3g} GiB"
    if device == "cpu":
        if free_cpu is None or n_bytes <= ACTIVATIONS_FREE_SHARE * free_cpu:
            return ActivationChoice("device", f"auto: {size} fit in CPU memory")
        return ActivationChoice("disk", f"auto: {size} exceed half of the "
                                        f"{free_cpu / GIB:.3g} GiB of free CPU memory")
    free_device = _free_device_bytes(device) if free_device is None else free_device
    if free_device is None or n_bytes <= ACTIVATIONS_FREE_SHARE * free_device:
        return ActivationChoice("device", f"auto: {size} fit on {device}")
    if free_cpu is None or n_bytes <= ACTIVATIONS_FREE_SHARE * free_cpu:
        return ActivationChoice("cpu", f"auto: {size} exceed half of the {free_device / GIB:.3g} "
                                       f"GiB free on {device}")
    return ActivationChoice("disk", f"auto: {size} exceed half of the free memory on {device} "
                                    "and on the CPU")


def hidden_size(config: Any) -> int:
    """The width of the hidden states between blocks, from a transformers config."""
    return int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)
               or getattr(config, "d_model", 0))


def activation_bytes(config: Any, n_samples: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes of the hidden states of ``n_samples x seq_len`` tokens between two blocks."""
    return n_samples * seq_len * hidden_size(config) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MemoryItem:
    what: str
    where: str  # "cpu", "device" or "disk"
    bytes: int


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    path: str  # "streaming" or "in-memory"
    device: str
    dtype: str
    parameters: int
    target_layers: int
    items: tuple[MemoryItem, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def total(self, where: str) -> int:
        return sum(item.bytes for item in self.items if item.where == where)

    @property
    def peak_cpu_bytes(self) -> int:
        return self.total("cpu")

    @property
    def peak_device_bytes(self) -> int:
        return self.total("device")

    @property
    def disk_bytes(self) -> int:
        return self.total("disk")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "path": self.path, "device": self.device,
                "dtype": self.dtype, "parameters": self.parameters,
                "target_layers": self.target_layers,
                "peak_cpu_bytes": self.peak_cpu_bytes,
                "peak_device_bytes": self.peak_device_bytes, "disk_bytes": self.disk_bytes,
                "items": [vars(item) for item in self.items], "notes": list(self.notes)}

    def table(self) -> str:
        lines = [f"memory plan for {self.model} ({self.parameters:,} parameters, {self.dtype}, "
                 f"{self.target_layers} target layers), {self.path} path on {self.device}:",
                 f"  {'item':<66} {'where':<7} {'GiB':>9}"]
        for item in self.items:
            lines.append(f"  {item.what:<66} {item.where:<7} {item.bytes / GIB:>9.3f}")
        lines.append(f"  peak CPU memory  {self.peak_cpu_bytes / GIB:.2f} GiB")
        if self.device != "cpu":
            lines.append(f"  peak GPU memory  {self.peak_device_bytes / GIB:.2f} GiB")
        lines.append(f"  disk             {self.disk_bytes / GIB:.2f} GiB")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _load_config(model: str | os.PathLike, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read the config of {model}: {exc}") from exc


def _dtype(config: Any, requested: torch.dtype | str | None) -> torch.dtype:
    value = requested if requested is not None else getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def _bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in module.parameters()) * size


def plan_memory(model: str | os.PathLike, recipe: Any, *, device: str = "cpu",
                dtype: torch.dtype | str | None = None, batch_size: int = 8,
                streaming: bool = True, trust_remote_code: bool = False,
                activations: str = "auto", world_size: int = 1) -> MemoryPlan:
    """The memory plan (see the module docstring) of pruning ``model`` (a folder or hub id
    whose ``config.json`` is read, nothing else) with ``recipe`` on ``device``, per process of
    ``world_size``; ``activations`` placed by :func:`choose_activations` (``auto``: by the
    memory free now)."""
    from .model.loading import _model_class
    from .model.streaming import parameters_on_meta

    config = _load_config(model, trust_remote_code)
    model_dtype = _dtype(config, dtype)
    model_class = _model_class(config, trust_remote_code)
    # A concrete class builds through _from_config, an Auto class (a config that names no
    # architecture) through from_config.
    build = getattr(model_class, "_from_config", None) or model_class.from_config
    with parameters_on_meta():
        meta_model = build(config, dtype=model_dtype)
    element = torch.empty((), dtype=model_dtype).element_size()
    stack = find_block_stack(meta_model)
    plan = build_plan(meta_model, recipe)
    parameters = sum(p.numel() for p in meta_model.parameters())
    total_bytes = parameters * element
    block_bytes = max(_bytes(block, model_dtype) for block in stack.modules)
    stack_bytes = sum(_bytes(block, model_dtype) for block in stack.modules)
    compute = "cpu" if device == "cpu" else "device"

    calibration = recipe.calibration
    uses_data = calibration.source != "none"
    hidden = hidden_size(config)
    intermediate = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0)
                       or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
    tokens = calibration.n_samples * calibration.seq_len
    local_samples = -(-calibration.n_samples // world_size)  # rank 0 holds the largest share
    batch = min(batch_size, calibration.n_samples)

    items = [MemoryItem("Python, torch and transformers", "cpu", RUNTIME_BYTES)]
    if streaming:
        items.append(MemoryItem("tensors outside the blocks (embeddings, head, norm)", "cpu",
                                total_bytes - stack_bytes))
        items.append(MemoryItem("the largest block's weights", compute, block_bytes))
    else:
        items.append(MemoryItem("the whole model's weights", "cpu", total_bytes))
        if compute == "device":
            items.append(MemoryItem("the largest block's weights (onloaded)", compute,
                                    block_bytes))
    notes = []
    if world_size > 1:
        notes.append(f"per process of {world_size} (torch.distributed): each holds its share of "
                     "the calibration samples, and each reads every block")
    if uses_data:
        held = local_samples * calibration.seq_len * hidden * element
        choice = choose_activations(activations, held, "cpu" if compute == "cpu" else device)
        where = {"device": compute, "cpu": "cpu", "disk": "disk"}[choice.placement]
        items.append(MemoryItem(f"calibration activations ({local_samples} x "
                                f"{calibration.seq_len} x {hidden})", where, held))
        items.append(MemoryItem(f"one batch re-forwarded ({batch} x {calibration.seq_len})",
                                compute, batch * calibration.seq_len * hidden * element))
        items.append(MemoryItem("one batch's forward inside a block (MLP, attention scores)",
                                compute, batch * calibration.seq_len
                                * (3 * intermediate * element + heads * calibration.seq_len
                                   * FP32)))
        layers = [layer for block in plan.blocks[:1] for layer in block.layers]
        solves = [(solve_bytes(*layer.layer.shape, method=layer.settings.method,
                               refit=layer.settings.refit,
                               block_size=layer.settings.block_size), layer)
                  for block in plan.blocks for layer in block.layers]
        per_block = max((sum(layer.layer.d_in ** 2 for layer in block.layers)
                         for block in plan.blocks), default=0) * FP32
        items.append(MemoryItem(f"Hessian accumulators of one block ({len(layers)} layers, "
                                "fp32, upper bound)", compute, per_block))
        if solves:
            largest_bytes, largest = max(solves, key=lambda pair: pair[0])
            d_out, d_in = largest.layer.shape
            settings = largest.settings
            items.append(MemoryItem(
                f"solving {largest.layer.name.split('.')[-1]} ({d_out} x {d_in}, "
                f"{settings.method}{', refit' if settings.refit else ''})", compute,
                largest_bytes))
        notes.append(f"activations: {choice.describe()}; --activations device|cpu|disk "
                     "chooses (disk: a memory-mapped file in the work folder)")
    else:
        notes.append("calibration source none: no activations, no Hessians")
    items.append(MemoryItem("the output checkpoint (dense format)", "disk", total_bytes))
    if streaming and uses_data:
        items.append(MemoryItem("stored block inputs for --resume (in-progress folder)", "disk",
                                tokens * hidden * element))
    return MemoryPlan(model=str(model), path="streaming" if streaming else "in-memory",
                      device=device, dtype=str(model_dtype).replace("torch.", ""),
                      parameters=parameters, target_layers=len(plan.layers),
                      items=tuple(items), notes=tuple(notes))


def free_disk_bytes(out_dir: str | os.PathLike) -> int | None:
    """Free space on the file system the output would go to (its nearest existing parent)."""
    path = Path(out_dir).expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


__all__ = ["MemoryItem", "MemoryPlan", "free_disk_bytes", "plan_memory"]
