"""Forward hooks that see each layer's inputs, and onload/offload of one module at a time.

Every hook is registered inside a context manager and removed on exit, on error too (the
attach/detach symmetry of accelerate's hooks): after any call here the model's
``_forward_hooks`` and ``_forward_pre_hooks`` are as they were.

Shapes: a layer's input ``X: (..., d_in)`` is handed on as it comes; accumulators flatten it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping, Protocol

import torch
from torch import nn


class InputAccumulator(Protocol):
    def add_batch(self, inputs: torch.Tensor) -> None: ...


class StopForward(Exception):
    """Raised from a hook once a forward has delivered every input it was run for."""


def until_stopped(forward: Callable[..., object], *args, **kwargs) -> None:
    """Call ``forward``; a :class:`StopForward` from a hook ends it early, quietly."""
    try:
        forward(*args, **kwargs)
    except StopForward:
        pass


@contextmanager
def input_hooks(modules: Mapping[str, nn.Module],
                callback: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, ``callback(name, X)`` runs with each module's first input on every
    call, before the module runs (so a callback may raise :class:`StopForward`)."""
    handles = []
    try:
        for name, module in modules.items():
            def hook(_module, args, kwargs, name=name):
                # Linear/Conv1D take one input, positional in every transformers model.
                callback(name, args[0] if args else next(iter(kwargs.values())))
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def accumulate_inputs(modules: Mapping[str, nn.Module],
                      accumulators: Mapping[str, InputAccumulator], *,
                      stop_after: str | None = None) -> Iterator[None]:
    """While active, every call of ``modules[name]`` feeds its input to ``accumulators[name]``.

    ``stop_after``: once that module's input is fed, raise :class:`StopForward` instead of
    running it and the rest of the forward (run forwards through :func:`until_stopped`). Only
    for a module called once per forward, the last of ``modules`` to be reached.
    """
    if stop_after is not None and stop_after not in modules:
        raise KeyError(f"stop_after {stop_after!r} is not one of the hooked modules")

    def feed(name: str, inputs: torch.Tensor) -> None:
        accumulators[name].add_batch(inputs.detach())
        if name == stop_after:
            raise StopForward

    with input_hooks(modules, feed):
        yield


@contextmanager
def output_gradient_hooks(modules: Mapping[str, nn.Module],
                          callback: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While active, ``callback(name, dL/dY)`` runs with the gradient of whatever is being
    differentiated with respect to each module's output ``Y: (..., d_out)``, when a backward
    pass reaches it (a tensor hook set on the output by a forward hook; a forward under
    ``no_grad`` sets none)."""
    handles = []
    try:
        for name, module in modules.items():
            def hook(_module, _args, output, name=name):
                if isinstance(output, torch.Tensor) and output.requires_grad:
                    output.register_hook(lambda grad, name=name: callback(name, grad))
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _own_device(module: nn.Module) -> torch.device | None:
    """Where ``module``'s own parameters and buffers live (None when it has none)."""
    for tensor in module.parameters(recurse=False):
        return tensor.device
    for tensor in module.buffers(recurse=False):
        return tensor.device
    return None


def _move_own_tensors_(module: nn.Module, device: torch.device) -> None:
    """Move ``module``'s own parameters and buffers (not its children's) to ``device``.

    Every ``Parameter`` object is kept (its ``.data`` moves), so tied weights stay tied;
    assigning a buffer by name keeps it registered as it was (persistent or not).
    """
    for param in module.parameters(recurse=False):
        if param.device != device:
            param.data = param.data.to(device)
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer.device != device:
            setattr(module, name, buffer.to(device))


@contextmanager
def _onloaded(modules: Iterable[nn.Module], device: torch.device) -> Iterator[None]:
    """Each of ``modules``' own tensors on ``device`` for the duration, then back home."""
    home = {}
    for sub in modules:
        where = _own_device(sub)
        if where is not None:
            home[sub] = where
    try:
        for sub in home:
            _move_own_tensors_(sub, device)
        yield
    finally:
        for sub, where in home.items():
            _move_own_tensors_(sub, where)


@contextmanager
def on_device(module: nn.Module, device: torch.device | str | None) -> Iterator[nn.Module]:
    """Onload ``module`` to ``device`` for the duration, then put it back where it was.

    A no-op when it is already there (a model that fits on the device stays there).
    """
    if device is None:
        yield module
        return
    with _onloaded(module.modules(), torch.device(device)):
        yield module


@contextmanager
def outside_on_device(model: nn.Module, excluded: nn.Module,
                      device: torch.device | str | None) -> Iterator[None]:
    """Onload every module of ``model`` outside ``excluded`` (the block stack): embeddings,
    rotary tables, final norms and heads, which the capture forward runs through."""
    if device is None:
        yield
        return
    inside = {id(m) for m in excluded.modules()}
    with _onloaded((m for m in model.modules() if id(m) not in inside), torch.device(device)):
        yield


__all__ = ["InputAccumulator", "StopForward", "accumulate_inputs", "input_hooks", "on_device",
           "output_gradient_hooks",
           "outside_on_device", "until_stopped"]
