"""Load a model and its tokenizer from a local folder or a hub id, safely by default.

* Pickle: ``.bin``/``.pt`` checkpoints can run arbitrary code when unpickled, so they are
  refused unless ``allow_pickle=True``; otherwise ``use_safetensors=True`` is passed to
  ``from_pretrained``.
* Remote code: ``trust_remote_code`` is passed explicitly (default False), so a checkpoint
  that ships its own modeling code is refused with an actionable error.
* The class is the one the checkpoint was saved as (``config.architectures[0]``, e.g.
  ``LlamaForCausalLM``, ``BertModel``), so saving it back gives the same tensors; without
  architectures, a causal LM when ``transformers`` knows one for the config, else the base
  model.

A local path that does not exist raises :class:`~obs_compress.errors.ModelLoadError` naming
it; anything that looks like a hub id (``org/name``) and is not a folder goes to the hub.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError, ModelLoadError, ObsCompressError

logger = logging.getLogger(__name__)

SAFE_WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, in eval mode
    tokenizer: Any | None  # None when the checkpoint has none
    source: str  # what was asked for: a folder or a hub id
    local_folder: Path | None  # the folder, when the source is local
    # set by ``obs_compress.load_pretrained(..., sparse_inference=True)``: which layer runs
    # which product (an ``obs_compress.inference.SparseInferenceReport``); None otherwise
    sparse_inference: Any | None = None


def _looks_like_path(name: str) -> bool:
    """A name that can only be a local path (hub ids are ``name`` or ``org/name``)."""
    return name.startswith(("/", ".", "~")) or "\\" in name or not _HUB_ID.match(name)


def _check_local_folder(folder: Path, allow_pickle: bool) -> None:
    if not folder.is_dir():
        raise ModelLoadError(f"model {str(folder)!r} is a file; give the folder that holds "
                             "config.json and the weights")
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = (f"; it holds GGUF files ({', '.join(ggufs)}): convert them once with "
                "tools/convert_gguf.py") if ggufs else ""
        raise ModelLoadError(f"model folder {str(folder)!r} has no config.json: not a Hugging "
                             f"Face model folder{hint}")
    names = [p.name for p in folder.iterdir() if p.is_file()]
    safe = [n for n in names if n.endswith(SAFE_WEIGHT_SUFFIXES)]
    pickled = [n for n in names if n.endswith(PICKLE_WEIGHT_SUFFIXES)
               and not n.startswith("training_args")]
    if not safe and pickled and not allow_pickle:
        raise ModelLoadError(
            f"model folder {str(folder)!r} holds only pickle weights "
            f"({', '.join(sorted(pickled))}); "
            "unpickling can run arbitrary code, so it is refused. Pass --allow-pickle "
            "(allow_pickle=True) if you trust this checkpoint, or convert it to safetensors")
    if not safe and not pickled:
        raise ModelLoadError(f"model folder {str(folder)!r} holds no weights "
                             "(*.safetensors, or *.bin with --allow-pickle)")


def _check_compressed_parts(folder: Path, config: Any) -> None:
    """Refuse a folder that stores compressed weights but whose config.json lost the
    section saying so: transformers would load it with those weights at random."""
    if getattr(config, "quantization_config", None):
        return
    from ..export.encoding import encoded_weights
    from ..export.shards import read_header

    for path in sorted(folder.glob("*.safetensors")):
        encoded = encoded_weights(read_header(path))
        if encoded:
            weight, format = sorted(encoded.items())[0]
            raise CheckpointFormatError(
                f"{path.name} stores {len(encoded)} weight(s) compressed ({weight} in {format}) "
                "but config.json has no quantization_config saying so; restore the section "
                "obs-compress wrote (docs/FORMAT.md), or the weights would load at random")


def _model_class(config: Any, trust_remote_code: bool):
    import transformers

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        for auto_name in ("AutoModelForCausalLM", "AutoModel"):
            if auto_name in auto_map:
                return getattr(transformers, auto_name)
    for architecture in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, architecture, None)
        if model_class is not None and hasattr(model_class, "from_pretrained"):
            return model_class
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _wrap(error: Exception, source: str, trust_remote_code: bool) -> ModelLoadError:
    text = str(error)
    if "trust_remote_code" in text and not trust_remote_code:
        return ModelLoadError(
            f"model {source!r} needs its own modeling code from the checkpoint; it is not run "
            "unless you pass --trust-remote-code (trust_remote_code=True) and trust its author")
    return ModelLoadError(f"could not load model {source!r}: {type(error).__name__}: {text}")


def load_model(source: str | os.PathLike, *, allow_pickle: bool = False,
               trust_remote_code: bool = False, dtype: torch.dtype | str | None = None,
               load_tokenizer: bool = True) -> LoadedModel:
    """Load ``source`` (a local folder or a hub id) in eval mode on CPU.

    ``dtype``: ``None`` keeps the checkpoint's dtype; otherwise a ``torch.dtype`` or its
    name (``"float32"``).
    """
    from transformers import AutoConfig

    name = os.fspath(source)
    folder = Path(name).expanduser()
    local = folder.exists()
    if not local and _looks_like_path(name):
        raise ModelLoadError(f"model {name!r}: no such folder (and not a hub id like "
                             "'HuggingFaceTB/SmolLM2-135M-Instruct')")
    if local:
        _check_local_folder(folder, allow_pickle)
    target = str(folder) if local else name
    common = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(target, **common)
    except Exception as exc:  # OSError, ValueError, network errors: all mean "cannot load"
        raise _wrap(exc, name, trust_remote_code) from exc
    kwargs: dict[str, Any] = dict(common)
    kwargs["use_safetensors"] = None if allow_pickle else True
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model_class = _model_class(config, trust_remote_code)
    if local:
        _check_compressed_parts(folder, config)
    try:
        model = model_class.from_pretrained(target, config=config, **kwargs)
    except ObsCompressError:
        raise  # a compressed folder's refusal (obs_compress.export.hf_quantizer) as it is
    except Exception as exc:
        raise _wrap(exc, name, trust_remote_code) from exc
    model.eval()
    tokenizer = None
    if load_tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(target, **common)
        except Exception as exc:  # a model without tokenizer files still prunes from ids
            logger.warning("no tokenizer loaded for %s (%s: %s)", name, type(exc).__name__, exc)
    logger.info("loaded %s (%s, %s parameters)", name, type(model).__name__,
                f"{sum(p.numel() for p in model.parameters()):,}")
    return LoadedModel(model=model, tokenizer=tokenizer, source=name,
                       local_folder=folder.resolve() if local else None)


__all__ = ["LoadedModel", "load_model"]
