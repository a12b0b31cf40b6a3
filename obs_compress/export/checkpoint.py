"""Write a pruned model as a Hugging Face folder that stock ``transformers`` loads unchanged.

One writer: ``model.save_pretrained`` (transformers' public call) writes the weights,
``config.json`` and the generation config into a temporary folder; this module adds what
transformers does not know about: the ``sparsity`` section of ``config.json`` (method,
pattern, global sparsity, targets), the source folder's other files carried over (tokenizer,
a sentence-transformers model's ``modules.json`` and ``1_Pooling/``,...), the model card (``model_card.py``: ours, the source's folded in), the
recipe used (``recipe.yaml``) and the run's report (``obs_compress_report.json``). transformers
owns the state dict (tied weights written once, loading-time renames reverted, shards and
their index), so a checkpoint it writes is one it reads back.

Atomic: everything is written into a hidden sibling folder
``.<out>.partial-<pid>-<random>`` that is renamed to ``out`` only when complete; on any error
(or Ctrl-C) it is removed. A run killed outright can leave such a folder behind; it is
clearly named, never mistaken for a checkpoint, and removed by the next save into the same
parent once its process is gone. An existing non-empty ``out`` is refused unless
``overwrite``, and ``out`` may never be, contain or sit inside the source folder. Files and
folders get the ordinary umask permissions (a temporary folder would otherwise stay 0700).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Iterator, Mapping

from torch import nn

from ..errors import InvalidArgument, OutputExistsError, UnsupportedModel
from ..model.blocks import find_block_stack, find_layers
from . import formats
from .encoding import WeightEncoding, plan_encodings, quantization_section
from .model_card import write_model_card
from .shards import checkpoint_layout, write_model_config, write_state_dict

logger = logging.getLogger(__name__)

RECIPE_NAME = "recipe.yaml"
REPORT_NAME = "obs_compress_report.json"
CONFIG_NAME = "config.json"
SPARSITY_KEY = "sparsity"
PARTIAL_INFIX = ".partial-"

# Tokenizer files as transformers writes them (plus the sentencepiece/tiktoken variants): a
# source holding none of them gets the in-memory tokenizer saved instead.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.json", "chat_template.jinja", "*.tiktoken")
# Weights in any format are never carried over from the source: the output's are written
# fresh, and a copy of the source's would put the dense model back beside the pruned one.
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf",
                "*.safetensors.index.json", "*.bin.index.json",
                "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.ot", "*.tflite")
# Top-level files of the source that describe the dense model: written fresh for the output,
# or this tool's records of an earlier run on the source (its report, a conversion marker).
REWRITTEN_FILES = (CONFIG_NAME, "generation_config.json", RECIPE_NAME, "obs_compress_*.json")


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("obs-compress")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


# --------------------------------------------------------------------------- output folder


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
                     source: str | os.PathLike | None = None) -> Path:
    """Refuse an output folder that cannot be written; returns it resolved.

    Call it before a long run, so that a refusal comes before the work.
    """
    out = Path(out_dir).expanduser().resolve()
    if source is not None:
        source_path = Path(source).expanduser()
        if source_path.exists():
            source_path = source_path.resolve()
            if _inside(out, source_path) or _inside(source_path, out):
                raise InvalidArgument(
                    f"output folder {out} would overlap the source model folder {source_path}; "
                    "the source is never modified, choose an --out outside it")
    if out.exists():
        if not out.is_dir():
            raise OutputExistsError(f"output {out} exists and is a file; choose another --out")
        if any(out.iterdir()) and not overwrite:
            raise OutputExistsError(
                f"output folder {out} exists and is not empty; pass --overwrite "
                "(overwrite=True) to replace it, or choose another --out")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> None:
    """Remove ``.<out>.partial-<pid>-*`` folders left by runs that were killed."""
    if not out.parent.is_dir():
        return
    prefix = f".{out.name}{PARTIAL_INFIX}"
    for entry in out.parent.iterdir():
        if not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        pid_text = entry.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            logger.info("removing %s, left by an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)


def apply_umask_permissions(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions a new file or folder gets
    (0o666 / 0o777 minus the umask): the temporary folder and some writers' files would
    otherwise be private (0o700 / 0o600) and hide the checkpoint from other users."""
    umask = os.umask(0o022)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def commit_folder(partial: Path, out: Path, *, overwrite: bool = False,
                  source: str | os.PathLike | None = None) -> None:
    """Make the complete folder ``partial`` the output ``out``, by a rename."""
    apply_umask_permissions(partial)
    # Checked again: something may have appeared in ``out`` during a long run.
    check_output_dir(out, overwrite=overwrite, source=source)
    if out.exists():
        aside = out.parent / f".{out.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out.rename(aside)
        partial.rename(out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        partial.rename(out)


@contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False,
                      source: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``out_dir``, on error it is removed."""
    out = check_output_dir(out_dir, overwrite=overwrite, source=source)
    created = [p for p in reversed(out.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    partial = out.parent / f".{out.name}{PARTIAL_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    committed = False
    try:
        yield partial
        commit_folder(partial, out, overwrite=overwrite, source=source)
        committed = True
    finally:
        if not committed:
            shutil.rmtree(partial, ignore_errors=True)
            for parent in reversed(created):
                try:
                    parent.rmdir()
                except OSError:
                    break


# --------------------------------------------------------------------------- contents


def model_sparsity(model: nn.Module) -> tuple[float, list[str]]:
    """Global fraction of zeros over the prunable layers inside the block stack, and the
    names of those holding any zero (used when no report is given)."""
    stack = find_block_stack(model)
    zeros = total = 0
    names = []
    for index, block in enumerate(stack.modules):
        for layer in find_layers(block, stack.block_name(index)):
            count = int((layer.module.weight == 0).sum())
            zeros += count
            total += layer.module.weight.numel()
            if count:
                names.append(layer.name)
    return (zeros / total if total else 0.0), names


def resolve_nm_pattern(format: str, layer_patterns: Any, recipe_pattern: Any = None,
                       pattern: Any = None):
    """The N:M pattern the ``nm`` format encodes (None for the other formats): ``pattern`` if
    given, else the one pattern every target layer was pruned to, else the recipe's."""
    from ..math.masks import parse_pattern

    if formats.check_format(format) != "nm":
        return None
    if pattern is not None:
        chosen = parse_pattern(pattern)
    else:
        found = sorted({str(p) for p in layer_patterns}) or (
            [str(recipe_pattern)] if recipe_pattern else [])
        if len(found) != 1:
            raise InvalidArgument(
                f"format nm needs every target pruned to one N:M pattern; the targets have "
                f"{', '.join(found) or 'no recorded pattern'} (give the pattern, --pattern N:M)")
        chosen = parse_pattern(found[0])
    if not chosen.is_nm:
        raise InvalidArgument(f"format nm needs an N:M pattern, the targets are {chosen}")
    return chosen


def sparsity_section(model: nn.Module, *, recipe: Any = None, report: Any = None,
                     format: str = "dense") -> dict:
    """The ``sparsity`` section of ``config.json``."""
    recipe_dict = recipe.to_dict() if hasattr(recipe, "to_dict") else (recipe or {})
    if report is not None:
        layers = report.layers
        global_sparsity = report.global_sparsity
        targets = [layer.name for layer in layers]
        patterns: dict[str, int] = {}
        for layer in layers:
            patterns[layer.pattern] = patterns.get(layer.pattern, 0) + 1
        methods = sorted({layer.method for layer in layers})
    else:
        global_sparsity, targets = model_sparsity(model)
        patterns, methods = {}, []
    return {
        # dense: zeros stored in place, any loader reads it as an ordinary model; bitmask, nm:
        # the targets encoded (config.json's quantization_config, docs/FORMAT.md)
        "format": formats.check_format(format),
        "tool": f"obs_compress {_tool_version()}",
        "method": recipe_dict.get("method", methods[0] if len(methods) == 1 else None),
        "pattern": recipe_dict.get("pattern"),
        "sparsity": recipe_dict.get("sparsity"),
        "global_sparsity": global_sparsity,
        "patterns": patterns,  # pattern -> number of layers (differs with overrides)
        "overrides": recipe_dict.get("overrides", []),
        "targets": targets,
    }


def _quant_method(quantization: Any) -> str | None:
    if quantization is None:
        return None
    method = (quantization.get("quant_method") if isinstance(quantization, Mapping)
              else getattr(quantization, "quant_method", None))
    method = getattr(method, "value", method)
    return str(method).lower() if method is not None else None


@contextmanager
def _as_plain_weights(model: nn.Module) -> Iterator[None]:
    """The model as plain weights for ``save_pretrained``, restored afterwards.

    A GGUF model is dequantized on load, so its tensors are plain already, but it still
    carries the quantizer and ``quantization_config``: without them for the duration, the
    saved folder would claim a GGUF quantization. Any other quantization is refused.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = model.config
    quantization = getattr(config, "quantization_config", None)
    if quantizer is None and quantization is None:
        yield
        return
    method = _quant_method(quantization) or _quant_method(
        getattr(quantizer, "quantization_config", None))
    if method != "gguf":
        raise UnsupportedModel(f"model is quantized ({method}); load it in full precision "
                               "to prune and save it")
    had_quantization = hasattr(config, "quantization_config")
    model.hf_quantizer = None
    if had_quantization:
        del config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if had_quantization:
            config.quantization_config = quantization


def check_shard_size(max_shard_size: int | str) -> int:
    """``max_shard_size`` in bytes (``"2GB"``, ``"500MiB"``, ``5000000``), checked before a
    long run rather than at its end; the parsing is transformers' own."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        size = None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgument(f"max shard size {max_shard_size!r} must be a positive number of "
                              "bytes or a number with a unit (e.g. '2GB', '500MiB')")
    return size


def carry_over_source_files(source: Path, destination: Path) -> list[str]:
    """Copy every file of ``source`` that ``destination`` does not have yet, subfolders
    included, except weights (:data:`WEIGHT_FILES`), the top-level files written fresh
    (:data:`REWRITTEN_FILES`) and hidden entries (``.git``, ``.cache``, ``.gitattributes``:
    version control and download caches, not the model). Returns the copied paths, relative
    to ``source``.

    So the output keeps what the tool does not rewrite: the tokenizer, a sentence-transformers
    model's ``modules.json``, ``1_Pooling/`` and ``sentence_bert_config.json``. (The model card is written before, so the source's is not copied over it: ``model_card.py`` folds it in.)
    Symbolic links (a hub cache's snapshot) are copied as the files they point to.
    """
    carried = []
    for root, folders, files in os.walk(source):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        relative_root = Path(root).relative_to(source)
        for name in sorted(files):
            relative = relative_root / name
            if (name.startswith(".") or any(fnmatch(name.lower(), p) for p in WEIGHT_FILES)
                    or (relative_root == Path(".")
                        and any(fnmatch(name, p) for p in REWRITTEN_FILES))
                    or (destination / relative).exists()):
                continue
            (destination / relative_root).mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(root) / name, destination / relative)
            carried.append(relative.as_posix())
    return carried


def write_folder_contents(folder: Path, model: nn.Module, *, tokenizer: Any = None,
                          source: str | os.PathLike | None = None, recipe: Any = None,
                          report: Any = None, max_shard_size: int | str = "2GB",
                          format: str = "dense", pattern: Any = None) -> None:
    """Write weights, config, the source's other files, recipe and report into ``folder``
    (no atomicity). ``format``: how the pruned targets' weights are stored (:mod:`.formats`;
    the targets are the report's layers, else the block-stack layers holding zeros)."""
    formats.check_format(format)
    with _as_plain_weights(model):
        shard_bytes = check_shard_size(max_shard_size)
        layout = checkpoint_layout(model, shard_bytes)
        section = sparsity_section(model, recipe=recipe, report=report)
        encodings = {}
        if format != "dense":
            layer_patterns = [layer.pattern for layer in report.layers] if report else []
            recipe_dict = recipe.to_dict() if hasattr(recipe, "to_dict") else (recipe or {})
            nm = resolve_nm_pattern(format, layer_patterns, recipe_dict.get("pattern"), pattern)
            encodings = plan_encodings(model, layout.sources, format, section["targets"], nm)
        write_state_dict(folder, model, shard_bytes, encodings, layout=layout)
        write_side_files(folder, model, tokenizer=tokenizer, source=source, recipe=recipe,
                         report=report, encodings=encodings, section=section)


def write_side_files(folder: Path, model: nn.Module, *, tokenizer: Any = None,
                     source: str | os.PathLike | None = None, recipe: Any = None,
                     report: Any = None, encodings: Mapping[str, WeightEncoding] | None = None,
                     section: Mapping[str, Any] | None = None, card_note: str | None = None
                     ) -> None:
    """Everything but the weights: config (with the ``sparsity`` section, and for a
    compressed format the ``quantization_config`` section naming the ``encodings``),
    generation config, the source's other files, the tokenizer, recipe and report.
    ``section``: the ``sparsity`` section when the caller has it (measured once before the
    weights were written, or the source's for a conversion); else it is measured here."""
    encodings = dict(encodings or {})
    format = next(iter({e.format for e in encodings.values()}), "dense")
    write_model_config(folder, model)
    config_path = folder / CONFIG_NAME
    data = json.loads(config_path.read_text(encoding="utf-8"))
    if section is None:
        section = sparsity_section(model, recipe=recipe, report=report, format=format)
    data[SPARSITY_KEY] = {**section, "format": format}
    data.pop(formats.QUANTIZATION_CONFIG_KEY, None)
    if encodings:
        first = next(iter(encodings.values()))
        nm = None
        if format == "nm":
            from ..math.masks import Pattern

            nm = Pattern(first.n, first.m)
        data[formats.QUANTIZATION_CONFIG_KEY] = quantization_section(
            format, nm, data[SPARSITY_KEY]["global_sparsity"], encodings, _tool_version())
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    source_folder = Path(source).expanduser() if source is not None else None
    if source_folder is not None and not source_folder.is_dir():
        source_folder = None
    # before the carry-over, so that the source's card is folded into ours, not copied over it
    write_model_card(folder, data[SPARSITY_KEY], recipe=recipe, report=report,
                     source=source_folder, note=card_note)
    carried = []
    if source_folder is not None:
        carried = carry_over_source_files(source_folder, folder)
    has_tokenizer = any(fnmatch(name, pattern) for name in carried for pattern in TOKENIZER_FILES)
    if not has_tokenizer and tokenizer is not None:
        tokenizer.save_pretrained(folder)

    if recipe is not None:
        text = recipe.to_yaml() if hasattr(recipe, "to_yaml") else json.dumps(recipe, indent=2)
        (folder / RECIPE_NAME).write_text(
            "# The recipe this checkpoint was pruned with (obs_compress).\n" + text,
            encoding="utf-8")
    if report is not None:
        data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        (folder / REPORT_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None,
                    source: str | os.PathLike | None = None, recipe: Any = None,
                    report: Any = None, overwrite: bool = False,
                    max_shard_size: int | str = "2GB", format: str = "dense",
                    pattern: Any = None) -> Path:
    """Write ``model`` to ``out_dir`` atomically (see the module docstring); returns the folder.

    ``source``: the folder the model was loaded from; its files other than weights and
    config are carried over (:func:`carry_over_source_files`) and it is protected from being
    overwritten. ``tokenizer`` is saved when the source has no tokenizer files.
    ``recipe``/``report``: stored beside the weights and summarised in ``config.json``'s
    ``sparsity`` section. ``format``: ``dense`` (zeros in place), ``bitmask`` or ``nm``
    (the pruned targets encoded, docs/FORMAT.md; ``pattern`` N:M for ``nm`` when the report
    and recipe do not say it).
    """
    formats.check_format(format)
    with atomic_output_dir(out_dir, overwrite=overwrite, source=source) as partial:
        write_folder_contents(partial, model, tokenizer=tokenizer, source=source, recipe=recipe,
                              report=report, max_shard_size=max_shard_size, format=format,
                              pattern=pattern)
    out = Path(out_dir).expanduser().resolve()
    logger.info("wrote %s", out)
    return out


def load_pretrained(folder: str | os.PathLike, *, allow_pickle: bool = False,
                    trust_remote_code: bool = False, dtype: Any = None):
    """Load a folder written by :func:`save_pretrained` (or any checkpoint) back.

    Returns a :class:`~obs_compress.model.loading.LoadedModel` (model and tokenizer).
    """
    from ..model.loading import load_model

    return load_model(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                      dtype=dtype)


def read_sparsity_section(folder: str | os.PathLike) -> Mapping[str, Any] | None:
    config = Path(folder) / CONFIG_NAME
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get(SPARSITY_KEY)


__all__ = ["RECIPE_NAME", "REPORT_NAME", "apply_umask_permissions", "atomic_output_dir",
           "carry_over_source_files", "check_output_dir", "commit_folder", "write_side_files", "check_shard_size", "load_pretrained",
           "read_sparsity_section", "remove_stale_partials", "save_pretrained",
           "sparsity_section", "write_folder_contents"]
