"""Stock ``from_pretrained`` loads a compressed folder (issue 12), through transformers'
quantizer extension points.

After ``import obs_compress``, ``AutoModelForCausalLM.from_pretrained(DIR)`` (or any
``from_pretrained``) of a folder whose ``config.json`` holds ``quantization_config`` with
``quant_method: obs_sparse`` (docs/FORMAT.md) returns a plain dense model whose weights are
bit-identical to the pruned model that was saved. Registered with
``transformers.quantizers.auto.register_quantization_config`` / ``register_quantizer`` (public
API, no patching) by :func:`register`, which ``import obs_compress`` calls.

How a load runs, in transformers' own order:

1. ``config.json``'s section becomes an :class:`ObsSparseConfig`. Its fields are checked
   against a fixed schema: the format is matched against the fixed table of
   :data:`.formats.FORMATS`; no name from the file is ever imported or called.
2. :meth:`ObsSparseQuantizer._process_model_before_weight_loading`, with the model still on
   the meta device: every safetensors header is checked against its file's size and every
   target's stored tensors against the model's shapes
   (:func:`.convert.check_compressed_files`), before any weight is read.
3. While transformers reads each shard (memory-mapped), one :class:`DecodeStoredWeight` per
   target weight receives that weight's stored tensors and returns the dense tensor
   (:func:`.encoding.decode_weight`: the mask or positions, the value count and the checksum
   checked). One weight's stored and dense tensors are in memory at a time beside the
   model, never a second copy of the model.
4. Transformers logs conversion errors and goes on with the weight left at random, so a
   decode refusal is recorded instead and raised, as the :class:`CheckpointFormatError`
   naming the tensor and the problem, from
   :meth:`ObsSparseQuantizer._process_model_after_weight_loading`: a model with a weight
   that failed to decode is never returned.
5. The config says ``dequantize``, so transformers then removes ``quantization_config`` and
   the quantizer from the loaded model: it is an ordinary dense model (``is_quantized``
   False), and ``save_pretrained`` or ``obs_compress.oneshot`` take it as any other. The
   ``sparsity`` section of ``config.json`` stays on ``model.config``.

A folder that says ``obs_sparse`` loaded without ``import obs_compress``: transformers warns
that it does not know the method and initialises the compressed weights at random; the
model card of every compressed folder says to import obs_compress first.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import CheckpointFormatError
from ..math.masks import parse_pattern
from . import formats
from .encoding import decode_weight

logger = logging.getLogger(__name__)

_FIELDS = (formats.FORMAT_KEY, formats.PATTERN_KEY, formats.GLOBAL_SPARSITY_KEY,
           formats.TARGETS_KEY, formats.TOOL_VERSION_KEY)


class ObsSparseConfig(QuantizationConfigMixin):
    """The ``quantization_config`` section of a compressed folder, checked field by field."""

    # Read by transformers' ``postprocess_model``: the loaded model is dense, not quantized.
    dequantize = True

    def __init__(self, format: str, pattern: str | None = None, global_sparsity: float | None = None,
                 targets: list[str] | None = None, tool_version: str | None = None,
                 quant_method: str = formats.QUANT_METHOD, **unknown: Any):
        if unknown:
            raise CheckpointFormatError(
                f"config.json's quantization_config has unknown fields {sorted(unknown)}; "
                f"obs_sparse knows {', '.join((formats.QUANT_METHOD_KEY,) + _FIELDS)}")
        if quant_method != formats.QUANT_METHOD:
            raise CheckpointFormatError(f"quant_method {quant_method!r} is not "
                                        f"{formats.QUANT_METHOD!r}")
        if not isinstance(format, str) or format not in formats.FORMATS[1:]:
            raise CheckpointFormatError(
                f"config.json's quantization_config names format {format!r}; an obs_sparse "
                f"folder is one of {', '.join(formats.FORMATS[1:])}")
        if format == "nm":
            if not isinstance(pattern, str) or not parse_pattern(pattern).is_nm:
                raise CheckpointFormatError(f"format nm needs an N:M pattern, config.json has "
                                            f"{pattern!r}")
        elif pattern is not None:
            raise CheckpointFormatError(f"format {format} takes no pattern, config.json has "
                                        f"{pattern!r}")
        if (not isinstance(targets, list) or not targets
                or not all(isinstance(t, str) for t in targets)):
            raise CheckpointFormatError("config.json's quantization_config needs `targets`, the "
                                        f"list of encoded weight names; it has {targets!r}")
        self.quant_method = formats.QUANT_METHOD
        self.format = format
        self.pattern = pattern
        self.global_sparsity = global_sparsity
        self.targets = list(targets)
        self.tool_version = tool_version


class DecodeStoredWeight(ConversionOps):
    """One weight's stored tensors (keyed by the source pattern that matched them) -> its
    dense tensor under the weight's name. A refusal is recorded on the quantizer (see the
    module docstring, step 4) and nothing is returned for the weight."""

    def __init__(self, quantizer: "ObsSparseQuantizer", suffix_of: dict[str, str]):
        self.quantizer = quantizer
        self.suffix_of = suffix_of  # source pattern -> stored-tensor suffix

    def __deepcopy__(self, memo: dict) -> "DecodeStoredWeight":
        # transformers copies the converter once per weight; every copy must report to the
        # one quantizer of this load
        return DecodeStoredWeight(self.quantizer, self.suffix_of)

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None,
                **kwargs: Any) -> dict[str, Any]:
        weight = full_layer_name
        config = self.quantizer.quantization_config
        stored = {}
        for pattern, tensors in input_dict.items():
            tensors = tensors if isinstance(tensors, list) else [tensors]
            if len(tensors) != 1:
                self.quantizer.failures[weight] = (f"{weight}: {len(tensors)} stored tensors "
                                                   f"match {pattern!r}, expected one")
                return {}
            stored[f"{weight}.{self.suffix_of[pattern]}"] = tensors[0]
        try:
            return {weight: decode_weight(weight, config.format, stored)}
        except CheckpointFormatError as exc:
            self.quantizer.failures[weight] = str(exc)
            return {}


class ObsSparseQuantizer(HfQuantizer):
    """Decodes an ``obs_sparse`` folder's pruned weights as transformers reads them."""

    # only folders written compressed load through it; it compresses nothing on load
    requires_calibration = True

    def __init__(self, quantization_config: ObsSparseConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.failures: dict[str, str] = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> Any:
        from pathlib import Path

        from .convert import check_compressed_files

        files = [Path(f) for f in checkpoint_files or []]
        if not files or any(f.suffix != ".safetensors" for f in files):
            raise CheckpointFormatError("an obs_sparse folder is read from its *.safetensors "
                                        f"files; this load has {[f.name for f in files]}")
        expected = {}
        prefix = getattr(model, "base_model_prefix", "")
        for name, tensor in model.state_dict().items():
            expected[name] = tuple(tensor.shape)
            # a folder saved from the causal LM loads into the base model and back
            if prefix:
                expected.setdefault(f"{prefix}.{name}", tuple(tensor.shape))
                expected.setdefault(name.removeprefix(f"{prefix}."), tuple(tensor.shape))
        check_compressed_files(files, self.quantization_config.format,
                               self.quantization_config.targets, expected)
        self.failures.clear()
        return model

    def get_weight_conversions(self) -> list[WeightConverter]:
        format = self.quantization_config.format
        # "weight.bitmask$", ...: only the stored parts of a weight, never another tensor
        suffix_of = {rf"weight\.{suffix}$": suffix
                     for suffix in formats.stored_names("weight", format)}
        return [WeightConverter(source_patterns=list(suffix_of), target_patterns="weight",
                                operations=[DecodeStoredWeight(self, suffix_of)])]

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if self.failures:
            first = sorted(self.failures)
            raise CheckpointFormatError(
                f"{len(first)} weight(s) of the obs_sparse folder failed to decode: "
                + "; ".join(self.failures[name] for name in first[:3])
                + (" ..." if len(first) > 3 else ""))
        # transformers keeps the conversions a load used, to revert them when the model is
        # saved; the decoded model is dense and saves dense, so ours is not reverted
        conversions = getattr(model, "_weight_conversions", None)
        if conversions is not None:
            model._weight_conversions = [
                c for c in conversions
                if not any(isinstance(op, DecodeStoredWeight) for op in getattr(c, "operations", ()))]
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True  # the loaded model is dense: it saves as any other

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register ``obs_sparse`` with transformers; a second call (or a reloaded copy of this
    module) leaves the first registration in place. Another package's ``obs_sparse`` is
    refused by transformers' own check ("already registered")."""
    for mapping, cls, register_fn in (
            (AUTO_QUANTIZATION_CONFIG_MAPPING, ObsSparseConfig, register_quantization_config),
            (AUTO_QUANTIZER_MAPPING, ObsSparseQuantizer, register_quantizer)):
        present = mapping.get(formats.QUANT_METHOD)
        if present is not None and (present.__module__, present.__qualname__) == (
                cls.__module__, cls.__qualname__):
            continue
        register_fn(formats.QUANT_METHOD)(cls)


__all__ = ["DecodeStoredWeight", "ObsSparseConfig", "ObsSparseQuantizer", "register"]
