"""Sparse inference: each pruned Linear of a model runs a sparse kernel where that is faster.

:func:`sparse_inference` replaces (in place) each pruned ``nn.Linear`` inside the block stack
with a :class:`SparseLinear` that holds the weight in a sparse layout and picks its product by
the number of tokens in the call:

* decode (at most ``decode_max_tokens`` tokens, 8 by default): the weight's bytes bound the
  time, and the sparse layout reads fewer of them. CPU: PyTorch's CSR with int32 indices
  (:mod:`obs_compress_kernels.csr_matmul`). CUDA: the Triton bitmask kernel
  (:mod:`obs_compress_kernels.bitmask_matmul`).
* prefill (more tokens): arithmetic bounds the time and the dense GEMM wins, so the weight is
  densified for the call (a temporary of one layer) and multiplied densely; on CUDA, a layer
  whose mask is 2:4 in fp16/bf16 uses PyTorch's semi-structured sparse tensor instead where
  the probe measures it faster (it regresses at small batch on H100, so never for decode).
  On CPU there is no semi-structured kernel: 2:4 prefill is dense there.

How "faster" is decided, and written in the returned :class:`SparseInferenceReport`:

* CPU, by a rule: CSR for decode when the layer's density (kept / all) is at most
  :data:`CPU_CSR_MAX_DENSITY`, its dtype is fp32 or fp64, and the block stack's prunable
  weights hold at least :data:`CPU_CSR_MIN_STACK_BYTES` (so that each token streams them from
  memory instead of the cache). A timing probe at swap time would measure one layer with its
  weight in the cache, where the dense GEMV wins; in a model whose weights exceed the cache
  CSR wins down to that density (``docs/benchmarks.md`` has the measurements behind the
  constants).
* CUDA, by a probe: dense against the sparse path timed with CUDA events on the layer's own
  weight at 1 and ``decode_max_tokens`` tokens (decode) and at :data:`PROBE_PREFILL_TOKENS`
  (2:4 prefill), once per distinct (shape, dtype, density to 0.01, 2:4) and reused.

Outputs equal the dense masked model's up to the order of the sums: in fp32 a layer's output
to ``rtol=atol=1e-5`` (tiny models), a whole SmolLM2-135M's logits to 1e-4 of their largest
magnitude (measured 1.4e-5) with the same greedy tokens; in bf16 to one output rounding
(``rtol=atol=2e-2`` on a tiny model's logits, CUDA only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from obs_compress_kernels import (BitmaskWeight, bitmask_matmul, bitmask_weight, csr_matmul,
                                  csr_nbytes, csr_to_dense, csr_weight, dense_weight)

from .errors import InvalidArgument
from .export.inspection import nm_holds
from .math import parse_pattern
from .model.blocks import find_block_stack, find_layers

logger = logging.getLogger(__name__)

POLICIES = ("auto", "always")
# CSR (int32 indices) reads nnz * 8 bytes in fp32 against 4 per entry dense: equal bytes at
# density 0.5, and measured to win there on a model larger than the cache (docs/benchmarks.md);
# at density 0.6 it measured even with dense, so the rule stops at 0.5.
CPU_CSR_MAX_DENSITY = 0.5
# Below this the block weights of a model stay in a server CPU's last-level cache between tokens
# (tens of MB) and the dense GEMV, reading cached bytes, beats CSR's indexing (a 0.3 MB model
# measured 0.77x with CSR); SmolLM2-135M's 425 MB stream from memory.
CPU_CSR_MIN_STACK_BYTES = 64 * 2**20
CPU_CSR_DTYPES = (torch.float32, torch.float64)  # MKL's sparse routines; others fall back slow
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
PROBE_PREFILL_TOKENS = 512
PROBE_REPEATS = 20

DecodePath = Literal["dense", "csr", "bitmask"]
PrefillPath = Literal["dense", "densified", "semi_structured"]


@dataclass(frozen=True)
class LayerPath:
    """Which product a layer runs for decode and for prefill, and why."""

    name: str
    shape: tuple[int, int]  # (d_out, d_in)
    density: float  # kept entries / all entries
    decode: DecodePath
    prefill: PrefillPath
    reason: str  # the rule applied, or the probe's figures
    weight_bytes: int  # bytes the layer's weight storage holds now
    dense_bytes: int  # bytes of the dense weight

    @property
    def sparse(self) -> bool:
        return self.decode != "dense" or self.prefill == "semi_structured"


@dataclass
class SparseInferenceReport:
    """What :func:`sparse_inference` did to each layer of the block stack."""

    device: str
    policy: str
    decode_max_tokens: int
    layers: list[LayerPath] = field(default_factory=list)

    @property
    def swapped(self) -> list[LayerPath]:
        return [layer for layer in self.layers if layer.sparse]

    def table(self) -> str:
        lines = [f"sparse inference on {self.device} (policy {self.policy}; decode = at most "
                 f"{self.decode_max_tokens} tokens per call): {len(self.swapped)} of "
                 f"{len(self.layers)} layers swapped",
                 f"{'layer':<40} {'shape':>11} {'density':>7} {'decode':>7} {'prefill':>15} "
                 f"{'MB':>6} {'dense MB':>8}  why"]
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            lines.append(f"{layer.name:<40} {shape:>11} {layer.density:>7.3f} {layer.decode:>7} "
                         f"{layer.prefill:>15} {layer.weight_bytes / 1e6:>6.2f} "
                         f"{layer.dense_bytes / 1e6:>8.2f}  {layer.reason}")
        return "\n".join(lines)


class SparseLinear(nn.Module):
    """A Linear whose weight is held sparse; the product is chosen by the call's token count.

    ``x: (..., in_features)`` -> ``(..., out_features)``. ``decode_weight`` is a CSR tensor
    (``decode == "csr"``), a :class:`BitmaskWeight` (``"bitmask"``) or the dense weight
    (``"dense"``, kept only when a semi-structured prefill weight stands beside it).
    """

    def __init__(self, decode: DecodePath, decode_weight: torch.Tensor | BitmaskWeight,
                 bias: torch.Tensor | None, shape: tuple[int, int], *, decode_max_tokens: int,
                 semi_structured_weight: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = shape
        self.decode = decode
        self.decode_max_tokens = decode_max_tokens
        self.decode_weight = decode_weight
        self.semi_structured_weight = semi_structured_weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def prefill(self) -> PrefillPath:
        if self.semi_structured_weight is not None:
            return "semi_structured"
        return "dense" if self.decode == "dense" else "densified"

    @property
    def dtype(self) -> torch.dtype:
        weight = self.decode_weight
        return weight.values.dtype if isinstance(weight, BitmaskWeight) else weight.dtype

    @property
    def device(self) -> torch.device:
        weight = self.decode_weight
        return weight.values.device if isinstance(weight, BitmaskWeight) else weight.device

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` dense weight (a new tensor for sparse layouts)."""
        if self.decode == "csr":
            return csr_to_dense(self.decode_weight)
        if self.decode == "bitmask":
            return dense_weight(self.decode_weight)
        return self.decode_weight

    def _decode_product(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode == "csr":
            return csr_matmul(x, self.decode_weight)
        if self.decode == "bitmask":
            return bitmask_matmul(x, self.decode_weight)
        return F.linear(x, self.decode_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.shape[-1] != self.in_features or x.dtype != self.dtype
                or x.device.type != self.device.type):
            # The sparse storage is chosen for one device and dtype and is not moved by
            # model.to(): the layout that is fastest on a CPU is not the one for a GPU.
            raise InvalidArgument(f"SparseLinear({self.out_features}x{self.in_features}, "
                                  f"{self.dtype} on {self.device}) got input {x.dtype} on "
                                  f"{x.device} of shape {tuple(x.shape)}: move and cast the "
                                  "model before sparse_inference, and feed it inputs to match")
        tokens = x.reshape(-1, self.in_features)
        if tokens.shape[0] <= self.decode_max_tokens:
            out = self._decode_product(tokens)
        elif self.semi_structured_weight is not None:
            out = F.linear(tokens, self.semi_structured_weight)
        else:  # prefill is bound by arithmetic: one dense temporary, one GEMM
            out = F.linear(tokens, self.dense_weight())
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"decode={self.decode}, prefill={self.prefill}, bias={self.bias is not None}")


def _cuda_ms(function: Callable[[], object]) -> float:
    """Median milliseconds of ``function`` on the current CUDA stream, after a warm-up."""
    for _ in range(3):
        function()
    times = []
    for _ in range(PROBE_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _is_2_4(weight: torch.Tensor) -> bool:
    return weight.shape[1] % 4 == 0 and nm_holds(weight, parse_pattern("2:4"), axis=1)


def _semi_structured(weight: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    try:
        return torch.sparse.to_sparse_semi_structured(weight), ""
    except (RuntimeError, ValueError) as error:  # shape or dtype the CUDA kernels refuse
        return None, f"semi-structured refused: {str(error).splitlines()[0][:80]}"


@dataclass(frozen=True)
class _Choice:
    decode: DecodePath
    semi_structured: bool
    reason: str


def _choose_cpu(weight: torch.Tensor, density: float, policy: str, stack_bytes: int) -> _Choice:
    if policy == "always":
        return _Choice("csr", False, "policy always")
    if stack_bytes < CPU_CSR_MIN_STACK_BYTES:
        return _Choice("dense", False, f"rule: block weights {stack_bytes / 2**20:.1f} MiB < "
                                       f"{CPU_CSR_MIN_STACK_BYTES // 2**20} MiB stay in cache")
    if weight.dtype not in CPU_CSR_DTYPES:
        return _Choice("dense", False, f"rule: CSR on CPU is measured for fp32/fp64 only, "
                                       f"not {weight.dtype}")
    if density > CPU_CSR_MAX_DENSITY:
        return _Choice("dense", False, f"rule: density {density:.3f} > {CPU_CSR_MAX_DENSITY}")
    return _Choice("csr", False, f"rule: density {density:.3f} <= {CPU_CSR_MAX_DENSITY}")


def _choose_cuda(weight: torch.Tensor, kept: torch.Tensor, policy: str,
                 decode_max_tokens: int) -> _Choice:
    packed = bitmask_weight(weight, kept)
    figures = []
    if policy == "always":
        decode: DecodePath = "bitmask"
        figures.append("policy always")
    else:
        faster = True
        for tokens in sorted({1, decode_max_tokens}):
            x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype, device=weight.device)
            dense_ms = _cuda_ms(lambda: F.linear(x, weight))
            sparse_ms = _cuda_ms(lambda: bitmask_matmul(x, packed))
            figures.append(f"{tokens} tok: dense {dense_ms:.3f} ms, bitmask {sparse_ms:.3f} ms")
            faster = faster and sparse_ms < dense_ms
        decode = "bitmask" if faster else "dense"
        figures[0] = "probe: " + figures[0]
    semi_structured = False
    if weight.dtype in SEMI_STRUCTURED_DTYPES and _is_2_4(weight):
        converted, refusal = _semi_structured(weight)
        if converted is not None:  # an odd token count, checked once: prefill lengths vary
            odd = torch.randn(decode_max_tokens + 5, weight.shape[1], dtype=weight.dtype,
                              device=weight.device)
            try:
                matches = torch.allclose(F.linear(odd, converted).float(),
                                         F.linear(odd, weight).float(), rtol=2e-2, atol=2e-2)
            except (RuntimeError, NotImplementedError) as error:
                matches, refusal = False, f"semi-structured failed: {str(error).splitlines()[0][:80]}"
            if not matches:
                converted, refusal = None, refusal or "semi-structured output differs from dense"
        if converted is None:
            figures.append(refusal)
        else:
            x = torch.randn(PROBE_PREFILL_TOKENS, weight.shape[1], dtype=weight.dtype,
                            device=weight.device)
            dense_ms = _cuda_ms(lambda: F.linear(x, weight))
            sparse_ms = _cuda_ms(lambda: F.linear(x, converted))
            semi_structured = sparse_ms < dense_ms or policy == "always"
            figures.append(f"{PROBE_PREFILL_TOKENS} tok: dense {dense_ms:.3f} ms, "
                           f"2:4 {sparse_ms:.3f} ms")
    return _Choice(decode, semi_structured, "; ".join(figures))


@torch.no_grad()
def sparse_inference(model: nn.Module, *, masks: Mapping[str, torch.Tensor] | None = None,
                     policy: str = "auto", decode_max_tokens: int = 8) -> SparseInferenceReport:
    """In place: swap each pruned ``nn.Linear`` (or ``Conv1D``) of ``model``'s block stack for a
    :class:`SparseLinear` where the sparse product is faster (module docstring: the rule on
    CPU, the probe on CUDA), and report every layer's paths.

    ``masks``: optional kept-entry masks (bool ``(d_out, d_in)``) by layer name; a layer
    without one keeps its nonzero entries. ``policy``: ``"auto"`` (decide per layer) or
    ``"always"`` (every pruned layer sparse, for tests and benchmarks). ``decode_max_tokens``:
    calls with at most this many tokens (batch x sequence) take the decode product. A layer
    with no zero entry is not pruned and stays as it is. GPT-2's ``Conv1D`` layers (weight
    stored ``(d_in, d_out)``) are swapped like Linears; their masks are ``(d_out, d_in)`` too.
    """
    if policy not in POLICIES:
        raise InvalidArgument(f"policy must be one of {POLICIES}, got {policy!r}")
    if not isinstance(decode_max_tokens, int) or decode_max_tokens < 1:
        raise InvalidArgument(f"decode_max_tokens must be an integer >= 1, got {decode_max_tokens!r}")
    if any(isinstance(module, SparseLinear) for module in model.modules()):
        raise InvalidArgument("this model already runs sparse inference (it holds SparseLinear "
                              "layers): call sparse_inference once, on the dense masked model")
    stack = find_block_stack(model)
    layers = [layer for index, block in enumerate(stack.modules)
              for layer in find_layers(block, stack.block_name(index))]
    masks = dict(masks or {})
    unknown = sorted(set(masks) - {layer.name for layer in layers})
    if unknown:
        raise InvalidArgument(f"masks name layers that are not prunable Linears of the block stack "
                              f"{stack.name}: {unknown[:5]}")
    device = {layer.module.weight.device.type for layer in layers}
    report = SparseInferenceReport(device="/".join(sorted(device)) or "none", policy=policy,
                                   decode_max_tokens=decode_max_tokens)
    stack_bytes = sum(layer.module.weight.numel() * layer.module.weight.element_size()
                      for layer in layers)
    choices: dict[tuple, _Choice] = {}  # one CUDA probe per distinct kind of layer
    for layer in layers:
        weight = layer.weight_matrix()  # (d_out, d_in); a transposed view for GPT-2's Conv1D
        dense_bytes = weight.numel() * weight.element_size()
        shape = tuple(layer.shape)
        if weight.device.type == "meta":
            raise InvalidArgument(f"layer {layer.name}: the weight is on the meta device (offloaded "
                                  "or not loaded): load the model onto one device before "
                                  "sparse_inference")
        kept = masks.get(layer.name)
        if kept is None:
            kept = weight != 0
        elif tuple(kept.shape) != shape or kept.dtype != torch.bool:
            raise InvalidArgument(f"masks[{layer.name!r}] must be bool of shape {shape}, got "
                                  f"{kept.dtype} of shape {tuple(kept.shape)}")
        else:
            kept = kept.to(weight.device)
            if bool((weight[~kept] != 0).any()):
                raise InvalidArgument(f"layer {layer.name}: the weight has nonzero entries where "
                                      f"masks[{layer.name!r}] is False; apply the mask first")
        density = int(kept.sum()) / max(kept.numel(), 1)
        if density >= 1.0:
            report.layers.append(LayerPath(layer.name, shape, density, "dense", "dense",
                                           "not pruned", dense_bytes, dense_bytes))
            continue
        if weight.is_cuda:
            key = (shape, weight.dtype, round(density, 2), _is_2_4(weight))
            if key not in choices:
                choices[key] = _choose_cuda(weight, kept, policy, decode_max_tokens)
            choice = choices[key]
        else:
            choice = _choose_cpu(weight, density, policy, stack_bytes)
        if choice.decode == "dense" and not choice.semi_structured:
            report.layers.append(LayerPath(layer.name, shape, density, "dense", "dense",
                                           choice.reason, dense_bytes, dense_bytes))
            continue
        if choice.decode == "csr":
            decode_weight = csr_weight(weight, kept)
            held = csr_nbytes(decode_weight)
        elif choice.decode == "bitmask":
            decode_weight = bitmask_weight(weight, kept)
            held = decode_weight.nbytes
        else:
            decode_weight, held = weight, dense_bytes
        semi = _semi_structured(weight)[0] if choice.semi_structured else None
        if semi is not None:
            held += _semi_bytes(semi)
        module = SparseLinear(choice.decode, decode_weight, layer.module.bias, shape,
                              decode_max_tokens=decode_max_tokens, semi_structured_weight=semi)
        parent_name, _, child = layer.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
        report.layers.append(LayerPath(layer.name, shape, density, module.decode, module.prefill,
                                       choice.reason, held, dense_bytes))
    logger.info("sparse inference: %d of %d layers swapped", len(report.swapped), len(report.layers))
    return report


def _semi_bytes(weight: torch.Tensor) -> int:
    """Bytes of a semi-structured sparse tensor's packed values and metadata."""
    names, _ = weight.__tensor_flatten__()
    return sum(getattr(weight, name).numel() * getattr(weight, name).element_size()
               for name in names if isinstance(getattr(weight, name), torch.Tensor))
