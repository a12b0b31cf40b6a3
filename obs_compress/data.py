"""Calibration and evaluation text and tokens, following the project's benchmark protocol.

The protocol (``../shared/data/README.md``; keep the two in step) fixes every choice that
changes a perplexity figure, so numbers compare across tools:

- calibration: C4 documents ``[0:1000]``; 128 samples of 512 tokens drawn with one
  ``random.Random(0)`` (:func:`calibration_samples` documents the exact draws);
- evaluation: WikiText-2 ``wiki.test.raw`` read whole in text mode (CRLF becomes ``\\n``), and
  C4 documents ``[1000:2000]`` joined with ``"\\n\\n"`` (:func:`protocol_texts`); tokenized
  without special tokens and cut into non-overlapping windows of 1024 tokens, of which the
  first 40 (WikiText-2) and 20 (C4) are scored (:func:`evaluation_windows`);
- :func:`token_digest` fingerprints token ids so two implementations can check they feed the
  same tokens (the README lists the expected digests for the SmolLM2 tokenizer).

Shapes: calibration samples ``(n_samples, seq_len)``, evaluation windows ``(n_windows, window)``,
both ``torch.int64``.

Local files are read with the standard library (``.txt``/``.raw``/``.json``/``.jsonl``) and
pyarrow (``.parquet``), which keep no cache and need no network; only the hub fallback for the
names ``"c4"``/``"wikitext2"`` goes through ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from obs_compress.errors import InvalidArgument, ObsCompressError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "OBS_COMPRESS_DATA_DIR"

# Named data sets: the file under the data folder, and how to fetch the same data from the hub.
C4_FILE = "c4/c4_validation_2k.parquet"
WIKITEXT2_FILE = "wikitext2/wiki.test.raw"
DATASET_FILES = {"c4": C4_FILE, "wikitext2": WIKITEXT2_FILE}

# The protocol's document slices and window counts (README, "The benchmark protocol").
CALIBRATION_DOCUMENTS = (0, 1000)  # C4 documents used for calibration
EVALUATION_DOCUMENTS = {"c4": (1000, 2000)}  # WikiText-2 is scored as one whole string
EVALUATION_WINDOW = 1024
EVALUATION_N_WINDOWS = {"wikitext2": 40, "c4": 20}
EVALUATION_JOINER = "\n\n"

TEXT_SUFFIXES = (".txt", ".raw")
TABLE_SUFFIXES = (".json", ".jsonl", ".parquet")
TEXT_FIELD = "text"


class DataNotFoundError(ObsCompressError, FileNotFoundError):
    """A data file, the shared data folder or every source of a named data set is missing."""


class DataFormatError(ObsCompressError, ValueError):
    """A data file cannot be read as documents (unknown suffix, no ``text`` field, bad JSON)."""


class InsufficientDataError(InvalidArgument):
    """The data holds fewer or shorter documents than the request needs."""


# ----------------------------------------------------------------------------------------------
# Finding and reading text


def _repo_root_of_package() -> Path:
    """The source checkout holding this package (its parent folder)."""
    return Path(__file__).resolve().parents[1]


def default_data_dir() -> Path:
    """The shared data folder: ``$OBS_COMPRESS_DATA_DIR``, else ``<repo root>/../shared/data``.

    ``<repo root>`` is looked for from the current working directory (itself, then the nearest
    ancestor holding a ``pyproject.toml``) and from this package's location.
    """
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(f"${DATA_DIR_ENV} is set to {path}, which is not a folder")
        return path.resolve()

    cwd = Path.cwd().resolve()
    roots = [cwd]
    roots += [parent for parent in cwd.parents if (parent / "pyproject.toml").is_file()][:1]
    roots.append(_repo_root_of_package())
    candidates = list(dict.fromkeys((root.parent / "shared" / "data") for root in roots))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(
        f"no shared data folder found (tried {tried}); set ${DATA_DIR_ENV} to the folder holding "
        f"{C4_FILE} and {WIKITEXT2_FILE}, or place it at <repo root>/../shared/data"
    )


def _check_text(value: object, path: Path, row: int) -> str:
    if not isinstance(value, str):
        raise DataFormatError(
            f"{path}: row {row} has a {TEXT_FIELD!r} of type {type(value).__name__}, not a string"
        )
    return value


def _texts_from_records(records: object, path: Path) -> list[str]:
    """``text`` values from parsed JSON: a list of objects or a column-oriented object."""
    if isinstance(records, dict):
        if TEXT_FIELD not in records:
            raise DataFormatError(
                f"{path} holds a JSON object without a {TEXT_FIELD!r} field "
                f"(fields: {sorted(records)[:10]})"
            )
        column = records[TEXT_FIELD]
        if isinstance(column, str):
            return [column]
        if not isinstance(column, list):
            raise DataFormatError(f"{path}: field {TEXT_FIELD!r} is neither a string nor a list")
        return [_check_text(value, path, row) for row, value in enumerate(column)]
    if isinstance(records, list):
        texts = []
        for row, record in enumerate(records):
            if not isinstance(record, dict) or TEXT_FIELD not in record:
                raise DataFormatError(
                    f"{path}: row {row} is not an object with a {TEXT_FIELD!r} field"
                )
            texts.append(_check_text(record[TEXT_FIELD], path, row))
        return texts
    raise DataFormatError(f"{path} holds JSON of type {type(records).__name__}, not rows")


def _read_json_lines(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}: line {line_number} is not JSON: {exc}") from exc
            if not isinstance(record, dict) or TEXT_FIELD not in record:
                raise DataFormatError(
                    f"{path}: line {line_number} is not an object with a {TEXT_FIELD!r} field"
                )
            texts.append(_check_text(record[TEXT_FIELD], path, line_number - 1))
    return texts


def _read_json(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        # `datasets.Dataset.to_json` writes JSON lines even under a `.json` name.
        return _read_json_lines(path)
    return _texts_from_records(records, path)


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise DataFormatError(f"{path} is not a readable parquet file: {exc}") from exc
    if TEXT_FIELD not in schema.names:
        raise DataFormatError(
            f"{path} has no {TEXT_FIELD!r} column (columns: {', '.join(schema.names)})"
        )
    column = pq.read_table(path, columns=[TEXT_FIELD]).column(TEXT_FIELD).to_pylist()
    return [_check_text(value, path, row) for row, value in enumerate(column)]


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        # Text mode on purpose: wiki.test.raw has CRLF line endings and the protocol's figures
        # assume Python's newline translation to "\n".
        with path.open(encoding="utf-8") as file:
            return [file.read()]
    if suffix == ".jsonl":
        return _read_json_lines(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataFormatError(
        f"{path}: unsupported file type {suffix or '(no suffix)'!r}; use one of "
        f"{', '.join(TEXT_SUFFIXES + TABLE_SUFFIXES)}"
    )


def _load_from_hub(name: str) -> list[str]:
    """The named data set from the Hugging Face hub, as the shared files hold it."""
    import datasets

    if name == "c4":
        # The shared parquet holds the first documents of the first validation shard.
        dataset = datasets.load_dataset(
            "allenai/c4",
            data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
            split="validation",
        )
        return list(dataset[TEXT_FIELD])
    # The hub stores wiki.test.raw one line per row; joining them gives the file back as one
    # document (figures may still differ slightly from the shared file's).
    dataset = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    return ["".join(dataset[TEXT_FIELD])]


def _load_named(name: str) -> list[str]:
    try:
        path = default_data_dir() / DATASET_FILES[name]
    except DataNotFoundError as exc:
        reason = str(exc)
    else:
        if path.is_file():
            return _read_file(path)
        reason = f"{path} does not exist"
    logger.warning("%s; trying the Hugging Face hub for %r", reason, name)
    try:
        texts = _load_from_hub(name)
    except Exception as exc:  # any failure (offline, missing package, auth) means unreachable
        raise DataNotFoundError(
            f"no {name!r} dataset is reachable: {reason}, and the hub download failed "
            f"({type(exc).__name__}: {exc}); pass a local file (.txt, .json, .jsonl, .parquet "
            f"with a {TEXT_FIELD!r} field) or use `--dataset self` to calibrate on text the "
            "model generates"
        ) from exc
    logger.warning("using %r from the hub; token digests may differ from the protocol's", name)
    return texts


def load_texts(source: str, *, start: int | None = None, stop: int | None = None) -> list[str]:
    """Documents of a data set: ``"c4"``, ``"wikitext2"`` or a local file path.

    A ``.txt``/``.raw`` file is one document (read whole in text mode); ``.json``, ``.jsonl``
    and ``.parquet`` files give one document per row (their ``text`` field). The names map to
    the shared data folder (:func:`default_data_dir`), falling back to the hub. ``start`` and
    ``stop`` slice the documents, as ``texts[start:stop]``.
    """
    source = os.fspath(source)
    if source in DATASET_FILES:
        texts = _load_named(source)
    else:
        texts = _read_file(Path(source).expanduser())
    return texts[start:stop]


def protocol_texts(name: str) -> str:
    """The evaluation string of the protocol for ``name``.

    ``"wikitext2"``: ``wiki.test.raw`` whole; ``"c4"``: C4 documents ``[1000:2000]`` joined with
    ``"\\n\\n"``; a local file: its documents (one for ``.txt``) joined with ``"\\n\\n"``.
    """
    start, stop = EVALUATION_DOCUMENTS.get(name, (None, None))
    texts = load_texts(name, start=start, stop=stop)
    if not texts:
        raise InsufficientDataError(f"{name}: no documents to evaluate on")
    return EVALUATION_JOINER.join(texts)


# ----------------------------------------------------------------------------------------------
# Tokens


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: long documents exceed model_max_length on purpose (they are cut later),
    # and the warning would be noise.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def calibration_samples(
    tokenizer,
    texts: Sequence[str],
    *,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.LongTensor:
    """``(n_samples, seq_len)`` token windows drawn from ``texts`` exactly as the protocol says.

    With one ``rng = random.Random(seed)``, for each sample: draw ``i = rng.randint(0,
    len(texts) - 1)`` until document ``i`` tokenizes (no special tokens) to more than
    ``seq_len`` tokens, then ``j = rng.randint(0, len(ids) - seq_len - 1)`` and take
    ``ids[j : j + seq_len]``. A document may be drawn more than once.
    """
    if n_samples < 1 or seq_len < 1:
        raise InvalidArgument(
            f"n_samples ({n_samples}) and seq_len ({seq_len}) must both be at least 1"
        )
    if not texts:
        raise InsufficientDataError("no calibration documents were given")
    n_texts = len(texts)
    token_ids: dict[int, list[int]] = {}  # tokenization cache: documents are drawn repeatedly
    # A long enough document is drawn with probability >= 1/n_texts, so 100 * n_texts failed
    # draws in a row happen with probability < e^-100 unless none is long enough.
    max_failed_draws = 100 * n_texts
    rng = random.Random(seed)
    samples = torch.empty((n_samples, seq_len), dtype=torch.int64)
    for sample in range(n_samples):
        failed_draws = 0
        while True:
            i = rng.randint(0, n_texts - 1)
            if i not in token_ids:
                token_ids[i] = _encode(tokenizer, texts[i])
            ids = token_ids[i]
            if len(ids) > seq_len:
                break
            failed_draws += 1
            all_short = len(token_ids) == n_texts and all(
                len(doc) <= seq_len for doc in token_ids.values()
            )
            if all_short or failed_draws >= max_failed_draws:
                longest = max(len(doc) for doc in token_ids.values())
                raise InsufficientDataError(
                    f"no calibration document tokenizes to more than seq_len={seq_len} tokens "
                    f"(longest seen: {longest} tokens in {len(token_ids)} of {n_texts} "
                    "documents); lower seq_len or give longer documents"
                )
        j = rng.randint(0, len(ids) - seq_len - 1)
        samples[sample] = torch.tensor(ids[j : j + seq_len], dtype=torch.int64)
    logger.debug(
        "drew %d calibration samples of %d tokens from %d distinct documents",
        n_samples,
        seq_len,
        len({i for i, ids in token_ids.items() if len(ids) > seq_len}),
    )
    return samples


def evaluation_windows(
    tokenizer, text: str, *, window: int = EVALUATION_WINDOW, n_windows: int | None = None
) -> torch.LongTensor:
    """``(n_windows, window)`` non-overlapping token windows from the start of ``text``.

    ``text`` is tokenized whole without special tokens; the incomplete tail is dropped.
    ``n_windows=None`` keeps every complete window.
    """
    if window < 2:
        raise InvalidArgument(f"window ({window}) must be at least 2 tokens to predict one")
    if n_windows is not None and n_windows < 1:
        raise InvalidArgument(f"n_windows ({n_windows}) must be at least 1 or None")
    ids = _encode(tokenizer, text)
    available = len(ids) // window
    if n_windows is None:
        n_windows = available
    if available < max(n_windows, 1):
        raise InsufficientDataError(
            f"the text tokenizes to {len(ids)} tokens: {available} windows of {window}, "
            f"fewer than the {max(n_windows, 1)} asked for"
        )
    return torch.tensor(ids[: n_windows * window], dtype=torch.int64).view(n_windows, window)


def token_digest(ids: torch.Tensor) -> str:
    """First 16 hex digits of the sha256 of ``ids`` as contiguous int64 bytes (native order)."""
    data = ids.detach().to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Text from the model itself


def self_generated_texts(
    model,
    tokenizer,
    *,
    n_texts: int,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 8,
    prompt: str = "The",
) -> list[str]:
    """Calibration text sampled from ``model`` itself, for when no data set is reachable.

    Each text starts from the tokenizer's BOS token (``prompt`` when it has none) and is sampled
    at temperature 1 with no top-k/top-p cut, so the texts follow the model's own distribution
    (the data-free calibration idea of LLM-QAT, Liu et al. 2023). End-of-sequence is suppressed
    until ``max_new_tokens`` so every text is long; ask for comfortably more tokens than the
    calibration ``seq_len``, since decoding and re-tokenizing can shorten a text. Deterministic
    for a ``seed``; the global RNG state is restored afterwards. The model's training flag is
    restored too.
    """
    if n_texts < 1 or max_new_tokens < 1 or batch_size < 1:
        raise InvalidArgument(
            f"n_texts ({n_texts}), max_new_tokens ({max_new_tokens}) and batch_size "
            f"({batch_size}) must all be at least 1"
        )
    from transformers import GenerationConfig

    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id]
    else:
        prompt_ids = _encode(tokenizer, prompt)
        if not prompt_ids:
            raise InvalidArgument(f"prompt {prompt!r} tokenizes to no tokens")
    eos_token_id = tokenizer.eos_token_id
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id
    generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id if pad_token_id is not None else 0,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    devices = [device] if device.type == "cuda" else []
    try:
        # Seed a private copy of the RNG state: sampling is reproducible and the caller's
        # random streams are left as they were.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch_start in range(0, n_texts, batch_size):
                rows = min(batch_size, n_texts - batch_start)
                input_ids = torch.tensor([prompt_ids] * rows, dtype=torch.int64, device=device)
                with torch.inference_mode():
                    output = model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        generation_config=generation_config,
                    )
                texts += tokenizer.batch_decode(
                    output[:, len(prompt_ids) :], skip_special_tokens=True
                )
    finally:
        model.train(was_training)
    logger.info("generated %d calibration texts of %d tokens", len(texts), max_new_tokens)
    return texts
