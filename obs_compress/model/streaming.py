"""A model whose weights stay on disk: built on the meta device, onloaded one block at a time.

:func:`open_streaming_model` builds the model from its ``config.json`` with every parameter on
the meta device (buffers computed for real: rotary tables and masks are no weights), then
loads the tensors outside the block stack (embeddings, final norm, head; tied weights once)
from the folder's safetensors files, memory-mapped (``safetensors.safe_open``). The driver
then calls :meth:`StreamingModel.load_block_` before it works on a block (its tensors read
into memory of their own), and the caller :meth:`StreamingModel.release_block_` once the
block's tensors are written, so memory holds one block, not the model; the tensors outside
the stack are released (:meth:`StreamingModel.release_outside_`) once the first block's
inputs are captured.

What ``from_pretrained`` would do is done the same way here, or refused:

* names: a file tensor is found under the model's name, or without / with the base model's
  prefix (a GPT-2 checkpoint saved as ``h.0...`` for ``transformer.h.0...``);
* a parameter the files do not hold would be initialised at random by transformers: refused,
  naming it (a persistent buffer missing from the files keeps its computed value, as there);
* dtype: the requested one, else the config's ``dtype``, else the first floating tensor's in
  the files; floating tensors are cast to it as ``from_pretrained`` casts them;
* a shape that differs from the module's is refused, naming the tensor.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ModelLoadError, NonFiniteError
from .blocks import BlockStack, find_block_stack

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters registered meanwhile are moved to the meta device as they are registered
    (one at a time is ever real); buffers stay where they are made."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def safetensors_files(folder: Path) -> dict[str, str]:
    """File tensor name -> file name, from the index or from the files' headers."""
    from safetensors import safe_open

    index = folder / INDEX_NAME
    if index.is_file():
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    found: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                found[name] = path.name
    return found


def _file_dtype(folder: Path, files: dict[str, str]) -> torch.dtype:
    from safetensors import safe_open

    first = sorted(set(files.values()))[0]
    with safe_open(str(folder / first), framework="pt") as handle:
        for name in handle.keys():
            tensor = handle.get_slice(name)
            dtype = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16",
                                    "F64": "float64"}.get(tensor.get_dtype(), ""), None)
            if dtype is not None:
                return dtype
    return torch.get_default_dtype()


def resolve_dtype(config: Any, requested: torch.dtype | str | None, folder: Path,
                  files: dict[str, str]) -> torch.dtype:
    """The dtype ``from_pretrained(dtype=requested or "auto")`` gives the model."""
    if requested is not None:
        return getattr(torch, requested) if isinstance(requested, str) else requested
    configured = getattr(config, "dtype", None)
    if configured is not None:
        return getattr(torch, configured) if isinstance(configured, str) else configured
    return _file_dtype(folder, files)


@dataclass
class StreamingModel:
    """A meta-device model and where each of its tensors lies in the source files."""

    model: nn.Module
    folder: Path
    stack: BlockStack
    # Each distinct tensor of the model: its state-dict names (tied copies share one entry)
    # and the file tensor it is loaded from (None: a buffer kept as computed).
    groups: list[tuple[list[str], str | None]]
    files: dict[str, str]
    _handles: dict[str, Any] = field(default_factory=dict)

    def _read(self, file_name: str, *, mapped: bool) -> torch.Tensor:
        """A file tensor, memory-mapped or (``mapped=False``) read into memory of its own."""
        from safetensors import safe_open

        file = self.files[file_name]
        if not mapped:
            from ..export.shards import read_tensor

            return read_tensor(self.folder / file, file_name)
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        return self._handles[file].get_tensor(file_name)

    def _groups_under(self, prefix: str | None) -> list[tuple[list[str], str | None]]:
        """The groups inside block ``prefix``, or (None) every group outside the stack."""
        blocks = tuple(self.stack.block_name(i) + "." for i in range(len(self.stack.modules)))
        if prefix is None:
            return [g for g in self.groups if not g[0][0].startswith(blocks)]
        return [g for g in self.groups if g[0][0].startswith(prefix + ".")]

    def _load_(self, groups: list[tuple[list[str], str | None]], *, mapped: bool) -> None:
        try:
            self._load_from_files_(groups, mapped=mapped)
        finally:
            # Handles closed after each load: a mapping's pages stay in the process's
            # resident set while it is open (only the outside tensors are mapped).
            self.close()

    def _load_from_files_(self, groups: list[tuple[list[str], str | None]], *,
                          mapped: bool) -> None:
        for names, file_name in groups:
            if file_name is None:
                continue
            current = self.model.get_parameter_or_buffer(names[0])
            value = self._read(file_name, mapped=mapped)
            if tuple(value.shape) != tuple(current.shape):
                raise ModelLoadError(
                    f"tensor {file_name} of {self.folder} has shape {tuple(value.shape)}; the "
                    f"model's {names[0]} is {tuple(current.shape)} (config.json does not match "
                    "the weights)")
            if value.is_floating_point() and value.dtype != current.dtype:
                value = value.to(current.dtype)
            if isinstance(current, nn.Parameter):
                value = nn.Parameter(value, requires_grad=current.requires_grad)
            for name in names:
                _assign_(self.model, name, value)

    def load_outside_blocks_(self) -> None:
        """Load embeddings, final norms, heads (and anything else outside the stack),
        memory-mapped: the capture reads only the embedding rows of the calibration tokens."""
        self._load_(self._groups_under(None), mapped=True)

    def load_block_(self, index: int, target_names: list[str]) -> None:
        """Load block ``index``'s tensors; ``target_names``' weights are checked finite.

        Read into memory of their own, not mapped: a pruned weight replaces its tensor, and
        a mapping's pages stay resident while any tensor of the mapping lives, so a mapped
        block would be counted twice by the end of its solves."""
        self._load_(self._groups_under(self.stack.block_name(index)), mapped=False)
        for name in target_names:
            weight = self.model.get_submodule(name).weight
            if not torch.isfinite(weight).all():
                raise NonFiniteError(f"layer {name}: the weight holds NaN or infinity; the "
                                     "checkpoint is broken, refusing to prune it")

    def release_block_(self, index: int) -> None:
        """Put block ``index``'s parameters back on the meta device (frees their memory)."""
        self._release_(self._groups_under(self.stack.block_name(index)))

    def release_outside_(self) -> None:
        """Put the parameters outside the stack back on the meta device: once the first
        block's inputs are captured (and the writer has them) nothing reads them again, and
        an embedding and a head are each ``vocab x hidden``."""
        self._release_(self._groups_under(None))

    def _release_(self, groups: list[tuple[list[str], str | None]]) -> None:
        for names, file_name in groups:
            current = self.model.get_parameter_or_buffer(names[0])
            if file_name is None or not isinstance(current, nn.Parameter):
                continue
            empty = nn.Parameter(torch.empty_like(current, device="meta"),
                                 requires_grad=current.requires_grad)
            for name in names:
                _assign_(self.model, name, empty)

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors by state-dict name (as loaded and pruned)."""
        return {name: self.model.get_parameter_or_buffer(name).detach()
                for names, _ in self._groups_under(self.stack.block_name(index))
                for name in names}

    def outside_state(self) -> dict[str, torch.Tensor]:
        return {name: self.model.get_parameter_or_buffer(name).detach()
                for names, _ in self._groups_under(None) for name in names}

    def close(self) -> None:
        self._handles.clear()


def _assign_(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attribute in module._parameters:
        module._parameters[attribute] = value
    else:
        module._buffers[attribute] = value


def _file_name(name: str, available: dict[str, str], prefix: str) -> str | None:
    if name in available:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in available:
        return name[len(prefix) + 1:]
    if prefix and f"{prefix}.{name}" in available:
        return f"{prefix}.{name}"
    return None


def open_streaming_model(folder: Path, model_class: Any, config: Any, *,
                         dtype: torch.dtype | str | None = None) -> StreamingModel:
    """Build ``model_class`` from ``config`` on the meta device and map its tensors to the
    safetensors files of ``folder``; loads the tensors outside the block stack."""
    files = safetensors_files(folder)
    dtype = resolve_dtype(config, dtype, folder, files)
    with parameters_on_meta():
        model = model_class._from_config(config, dtype=dtype)
    model.eval()
    stack = find_block_stack(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    by_tensor: dict[int, list[str]] = {}
    for name in model.state_dict():
        by_tensor.setdefault(id(model.get_parameter_or_buffer(name)), []).append(name)
    groups: list[tuple[list[str], str | None]] = []
    missing = []
    for names in by_tensor.values():
        found = next((f for f in (_file_name(n, files, prefix) for n in names) if f), None)
        tensor = model.get_parameter_or_buffer(names[0])
        if found is None and isinstance(tensor, nn.Parameter):
            missing.append(names[0])
        groups.append((names, found))
    if missing:
        raise ModelLoadError(
            f"the safetensors files of {folder} hold no tensor for {len(missing)} parameter(s) "
            f"of {type(model).__name__}: {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''}; transformers would initialise them at "
            "random, so the checkpoint is refused (is it complete, and does config.json "
            "describe it?)")
    streaming = StreamingModel(model=model, folder=folder, stack=stack, groups=groups,
                               files=files)
    streaming.load_outside_blocks_()
    logger.info("streaming %s: %d blocks loaded one at a time from %d safetensors file(s)",
                folder, len(stack.modules), len(set(files.values())))
    return streaming


__all__ = ["StreamingModel", "open_streaming_model", "parameters_on_meta", "resolve_dtype",
           "safetensors_files"]
