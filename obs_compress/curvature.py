"""The output-gradient Kronecker factor ``G`` of each Linear layer (issue 14).

Kronecker-factored curvature (K-FAC, Martens & Grosse 2015; LLM Surgeon, van der Ouderaa et
al. 2024, sec. 3) approximates the curvature of ``vec(W)`` of a layer ``Y = X W^T`` by
``F ~= G (x) A``: ``A = E[x x^T]`` over the layer's inputs (what the Hessian accumulators
already gather: ``H = 2 X^T X / n``) and

    ``G = E[g g^T] = (1/n) sum_t g_t g_t^T``,  ``g_t = dL/dy_t``: ``(d_out,)``

over the tokens ``t``, the gradients of a loss ``L`` with respect to the layer's OUTPUTS,
taken here with backward hooks (:func:`obs_compress.model.hooks.output_gradient_hooks`) and
summed by the same streaming accumulator as ``H`` (``G = H / 2`` of the gradients). Memory:
``d_out^2`` per layer. Two losses:

* ``block_reconstruction`` (:func:`block_output_factors`, one block at a time, no full
  backward): ``L = 1/2 ||f(x; W') - f(x; W)||^2``, the block's output error. At ``W' = W``
  its gradient is zero, so its curvature is its Gauss-Newton matrix ``J^T J`` (``J``: the
  Jacobian of the block output with respect to the layer output). It is sampled without
  forming ``J``: back-propagating ``eps ~ N(0, I)`` from the block output gives
  ``g = J^T eps`` with ``E[g g^T] = J^T J`` (the Fisher of a unit Gaussian output model).
  ``n_probes`` draws per batch.
* ``next_token`` (:func:`model_output_factors`): the model's summed cross-entropy on the
  calibration text, one backward per sample: the empirical Fisher. ``next_token_sampled``:
  the labels drawn from the model's own next-token distribution instead, the true Fisher
  (one draw per position).

Shapes: a block call's hidden states ``(batch, seq_len, hidden)``; ``g: (batch, seq_len,
d_out)``; ``G: (d_out, d_out)`` float32, symmetric, positive semi-definite.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional

from .errors import InvalidArgument
from .math.hessian import HessianAccumulator
from .model.blocks import BlockStack, PrunableLayer, module_device
from .model.capture import BlockCall, model_inputs
from .model.hooks import output_gradient_hooks
from .recipe import CURVATURE_LOSSES as LOSSES



def _accumulators(layers: Sequence[PrunableLayer],
                  device: torch.device | None) -> dict[str, HessianAccumulator]:
    if not layers:
        raise InvalidArgument("output factors need at least one layer")
    return {layer.name: HessianAccumulator(layer.shape[0], name=layer.name,
                                           device=device or module_device(layer.module))
            for layer in layers}


def _factors(accumulators: Mapping[str, HessianAccumulator]) -> dict[str, torch.Tensor]:
    # the accumulator's 2 sum g g^T / n; G is half of it
    return {name: accumulator.finalize().hessian / 2 for name, accumulator in accumulators.items()}


def _feed(accumulators: Mapping[str, HessianAccumulator]):
    return lambda name, grad: accumulators[name].add_batch(grad.detach())


def block_output_factors(block: nn.Module, calls: Sequence[BlockCall],
                         layers: Sequence[PrunableLayer], *, n_probes: int = 1, seed: int = 0,
                         device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """``{layer name: G}`` of ``layers`` (inside ``block``) under the block-output
    reconstruction loss, from ``n_probes`` Gaussian probes per calibration batch (see the
    module docstring). The block's parameters get no ``.grad``."""
    if n_probes < 1:
        raise InvalidArgument(f"n_probes must be >= 1, got {n_probes}")
    accumulators = _accumulators(layers, device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    modules = {layer.name: layer.module for layer in layers}
    with torch.enable_grad(), output_gradient_hooks(modules, _feed(accumulators)):
        for call in calls:
            hidden = call.hidden_states.detach().requires_grad_()
            output = call(block, hidden)
            for probe in range(n_probes):
                # drawn on the CPU so that a seed gives the same probes on every device
                eps = torch.randn(output.shape, generator=generator, dtype=torch.float32)
                torch.autograd.grad(output, hidden, grad_outputs=eps.to(output),
                                    retain_graph=probe + 1 < n_probes)
            del output
    return _factors(accumulators)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, *, sampled: bool,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of ``logits: (batch, seq_len, vocab)``: against the
    text (``input_ids`` shifted by one), or, ``sampled``, against labels drawn from the
    model's own distribution (one per position, from ``generator``)."""
    predicted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    if sampled:
        probabilities = predicted.detach().softmax(-1).cpu()
        labels = torch.multinomial(probabilities, 1, generator=generator).reshape(-1)
        labels = labels.to(predicted.device)
    else:
        labels = input_ids[:, 1:].reshape(-1).to(predicted.device)
    return functional.cross_entropy(predicted, labels, reduction="sum")


def model_output_factors(model: nn.Module, stack: BlockStack, input_ids: torch.Tensor,
                         layers: Sequence[PrunableLayer], *, loss: str = "next_token",
                         seed: int = 0, device: torch.device | None = None,
                         ) -> dict[str, torch.Tensor]:
    """``{layer name: G}`` of ``layers`` (anywhere in the block stack) under the model's
    next-token loss on ``input_ids: (n_samples, seq_len)``: one forward and backward per
    sample, the whole model resident. ``loss``: ``next_token`` (labels from the text, the
    empirical Fisher) or ``next_token_sampled`` (labels drawn from the model, the true
    Fisher). The gradients are taken with respect to block 0's input only, so no parameter
    gets a ``.grad``."""
    if loss not in LOSSES[1:]:
        raise InvalidArgument(f"model_output_factors takes loss next_token or "
                              f"next_token_sampled, got {loss!r}")
    accumulators = _accumulators(layers, device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    modules = {layer.name: layer.module for layer in layers}
    leaves: list[torch.Tensor] = []

    def block_input_as_leaf(_module, args, kwargs):
        # differentiate with respect to block 0's input: a leaf that needs a gradient, so
        # the backward reaches every block whether or not the parameters require grad
        if args:
            leaves.append(args[0].detach().requires_grad_())
            return (leaves[-1], *args[1:]), kwargs
        leaves.append(kwargs["hidden_states"].detach().requires_grad_())
        return args, {**kwargs, "hidden_states": leaves[-1]}

    handle = stack.modules[0].register_forward_pre_hook(block_input_as_leaf, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), output_gradient_hooks(modules, _feed(accumulators)):
            for sample in input_ids.split(1):
                leaves.clear()
                logits = model(**model_inputs(model, sample.to(device or sample.device))).logits
                value = next_token_loss(logits, sample, sampled=loss == "next_token_sampled",
                                        generator=generator)
                torch.autograd.grad(value, leaves[0])
    finally:
        handle.remove()
        model.train(was_training)
    return _factors(accumulators)


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise InvalidArgument(f"curvature loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return loss


__all__ = ["LOSSES", "block_output_factors", "check_loss", "model_output_factors",
           "next_token_loss"]
