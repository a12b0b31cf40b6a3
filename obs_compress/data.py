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

Sources of text (:func:`load_texts`), and where each is read from:

- ``"c4"``, ``"wikitext2"``: the files ``c4/c4_validation_2k.parquet`` and
  ``wikitext2/wiki.test.raw`` of the data folder, which is ``data_dir=`` (the CLI's
  ``--data-dir``) or else ``$OBS_COMPRESS_DATA_DIR`` (:func:`resolve_data_dir`); never the
  network, and never a folder guessed from the current directory or the install location;
- ``"hub:c4"``, ``"hub:wikitext2"``: the same data downloaded from the Hugging Face hub with
  ``datasets``, only when named so;
- anything else: a local file, ``.txt``/``.raw`` (one document) or ``.json``/``.jsonl``/
  ``.parquet`` (one document per row, its ``text`` field).

Local files are read with the standard library and pyarrow, which keep no cache and need no
network. A source that cannot be read is a typed error naming the file, the folder or the hub
data set and why: :class:`DataNotFoundError` (missing), :class:`DataReadError` (there but not
readable), :class:`DataFormatError` (not documents); nothing falls back to another source.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from obs_compress.errors import InvalidArgument, ObsCompressError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "OBS_COMPRESS_DATA_DIR"

# Named data sets: their file under the data folder. "hub:<name>" reads the same data set
# from the Hugging Face hub instead (HUB_DATASETS says from where).
C4_FILE = "c4/c4_validation_2k.parquet"
WIKITEXT2_FILE = "wikitext2/wiki.test.raw"
DATASET_FILES = {"c4": C4_FILE, "wikitext2": WIKITEXT2_FILE}
HUB_PREFIX = "hub:"
HUB_DATASETS = {
    "c4": "allenai/c4, file en/c4-validation.00000-of-00008.json.gz",
    "wikitext2": "wikitext, config wikitext-2-raw-v1, split test",
}

# The protocol's document slices and window counts (README, "The benchmark protocol"); the
# hub sources are the same data sets, so they are cut the same way.
CALIBRATION_DOCUMENTS = (0, 1000)  # C4 documents used for calibration
EVALUATION_DOCUMENTS = {"c4": (1000, 2000), "hub:c4": (1000, 2000)}  # WikiText-2: one string
EVALUATION_WINDOW = 1024
EVALUATION_N_WINDOWS = {"wikitext2": 40, "c4": 20, "hub:wikitext2": 40, "hub:c4": 20}
EVALUATION_JOINER = "\n\n"

TEXT_SUFFIXES = (".txt", ".raw")
TABLE_SUFFIXES = (".json", ".jsonl", ".parquet")
TEXT_FIELD = "text"

# What to do when no data folder is known; every message that suggests the folder says this.
_DATA_DIR_HELP = (
    f"pass --data-dir / data_dir= or set {DATA_DIR_ENV} to the folder holding {C4_FILE} and "
    f"{WIKITEXT2_FILE}"
)
_OTHER_SOURCES = (
    f"other sources: a local file (.txt, .json, .jsonl, .parquet with a {TEXT_FIELD!r} field), "
    f"{HUB_PREFIX}c4 or {HUB_PREFIX}wikitext2 (a download from the Hugging Face hub), or, to "
    "calibrate, `--dataset self` (text the model generates)"
)


class DataNotFoundError(ObsCompressError, FileNotFoundError):
    """A data file, the data folder or a hub data set is missing or was not given."""


class DataReadError(ObsCompressError, OSError):
    """A data file exists but cannot be read (no permission, a folder in its place, I/O)."""


class DataFormatError(ObsCompressError, ValueError):
    """A data file cannot be read as documents (unknown suffix, no ``text`` field, bad JSON)."""


class InsufficientDataError(InvalidArgument):
    """The data holds fewer or shorter documents than the request needs."""


# ----------------------------------------------------------------------------------------------
# Finding and reading text


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder of the names ``"c4"``/``"wikitext2"``: ``data_dir``, else
    ``$OBS_COMPRESS_DATA_DIR``; a :class:`DataNotFoundError` when neither is given or the
    path is not a folder. Nothing else is looked at (no search from the current directory).
    """
    if data_dir is not None:
        if not os.fspath(data_dir):
            raise InvalidArgument(f"data_dir is an empty path; {_DATA_DIR_HELP}")
        path, origin = Path(data_dir).expanduser(), "--data-dir / data_dir="
    elif os.environ.get(DATA_DIR_ENV):
        path, origin = Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    else:
        raise DataNotFoundError(f"no data folder given: {_DATA_DIR_HELP}; {_OTHER_SOURCES}")
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise DataNotFoundError(f"{origin} is set to {path}, which {what}; {_DATA_DIR_HELP}")
    return path.resolve()


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


def _read_json_lines(lines, path: Path) -> list[str]:
    """``text`` values of JSON lines; ``lines`` iterates the file's lines (newlines as ``\\n``)."""
    texts = []
    for line_number, line in enumerate(lines, start=1):
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


def _read_json(text: str, path: Path) -> list[str]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        # `datasets.Dataset.to_json` writes JSON lines even under a `.json` name.
        return _read_json_lines(io.StringIO(text), path)
    return _texts_from_records(records, path)


def _read_parquet(file: BinaryIO, path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise DataFormatError(f"{path} is not a readable parquet file: {exc}") from exc
    if TEXT_FIELD not in schema.names:
        raise DataFormatError(
            f"{path} has no {TEXT_FIELD!r} column (columns: {', '.join(schema.names)})"
        )
    file.seek(0)
    column = pq.read_table(file, columns=[TEXT_FIELD]).column(TEXT_FIELD).to_pylist()
    return [_check_text(value, path, row) for row, value in enumerate(column)]


def _unreadable(path: Path, exc: OSError) -> ObsCompressError:
    """The typed error for an ``OSError`` met while opening or reading the data file ``path``."""
    if isinstance(exc, FileNotFoundError):
        return DataNotFoundError(f"data file {path} does not exist")
    if isinstance(exc, IsADirectoryError):
        return DataReadError(f"data file {path} is a folder, not a file")
    if isinstance(exc, PermissionError):
        return DataReadError(f"data file {path} cannot be read: permission denied")
    return DataReadError(f"data file {path} cannot be read: {exc.strerror or exc}")


def _read_file(path: Path) -> list[str]:
    # The file is opened once, here, so that "missing" and "not readable" are told apart from
    # "not documents" (pyarrow reports all three as OSError).
    try:
        file = path.open("rb")
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    suffix = path.suffix.lower()
    with file:
        try:
            if suffix == ".parquet":
                return _read_parquet(file, path)
            if suffix in TEXT_SUFFIXES + (".json", ".jsonl"):
                # Text mode on purpose (universal newlines): wiki.test.raw has CRLF line
                # endings and the protocol's figures assume their translation to "\n".
                text_file = io.TextIOWrapper(file, encoding="utf-8")
                if suffix == ".jsonl":
                    return _read_json_lines(text_file, path)
                if suffix == ".json":
                    return _read_json(text_file.read(), path)
                return [text_file.read()]
        except UnicodeDecodeError as exc:
            raise DataFormatError(f"{path} is not UTF-8 text: {exc}") from exc
        except ObsCompressError:
            raise
        except OSError as exc:
            raise _unreadable(path, exc) from exc
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


def _load_hub(source: str) -> list[str]:
    """``"hub:c4"`` or ``"hub:wikitext2"``: the data set downloaded from the hub."""
    name = source[len(HUB_PREFIX) :]
    if name not in HUB_DATASETS:
        raise InvalidArgument(
            f"unknown hub data set {source!r}; the hub sources are "
            f"{', '.join(HUB_PREFIX + known for known in HUB_DATASETS)}"
        )
    try:
        texts = _load_from_hub(name)
    except Exception as exc:  # offline, `datasets` missing, auth, a moved file: all say "failed"
        raise DataNotFoundError(
            f"could not read {source!r} ({HUB_DATASETS[name]}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {exc}; the local {name!r} holds the same data without a "
            f"download: {_DATA_DIR_HELP}"
        ) from exc
    logger.warning("read %r from the hub; token digests may differ from the protocol's", source)
    return texts


def _load_named(name: str, data_dir: str | os.PathLike | None) -> list[str]:
    folder = resolve_data_dir(data_dir)
    path = folder / DATASET_FILES[name]
    if not path.exists():
        raise DataNotFoundError(
            f"data file {path} does not exist: the data folder {folder} has no "
            f"{DATASET_FILES[name]}; {_DATA_DIR_HELP}"
        )
    return _read_file(path)


def load_texts(
    source: str | os.PathLike,
    *,
    start: int | None = None,
    stop: int | None = None,
    data_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Documents of a data set: ``"c4"``, ``"wikitext2"``, ``"hub:c4"``, ``"hub:wikitext2"``
    or a local file path.

    A ``.txt``/``.raw`` file is one document (read whole in text mode); ``.json``, ``.jsonl``
    and ``.parquet`` files give one document per row (their ``text`` field). ``"c4"`` and
    ``"wikitext2"`` are files of the data folder (:func:`resolve_data_dir` of ``data_dir``);
    the ``hub:`` names download the same data sets. ``data_dir`` is only read for the local
    names. ``start`` and ``stop`` slice the documents, as ``texts[start:stop]``.
    """
    source = os.fspath(source)
    if source in DATASET_FILES:
        texts = _load_named(source, data_dir)
    elif source.startswith(HUB_PREFIX):
        texts = _load_hub(source)
    else:
        texts = _read_file(Path(source).expanduser())
    return texts[start:stop]


def protocol_texts(name: str | os.PathLike, *, data_dir: str | os.PathLike | None = None) -> str:
    """The evaluation string of the protocol for ``name`` (any :func:`load_texts` source).

    ``"wikitext2"``: ``wiki.test.raw`` whole; ``"c4"``: C4 documents ``[1000:2000]`` joined with
    ``"\\n\\n"`` (their ``hub:`` names likewise); a local file: its documents (one for ``.txt``)
    joined with ``"\\n\\n"``. ``data_dir`` as for :func:`load_texts`.
    """
    name = os.fspath(name)
    start, stop = EVALUATION_DOCUMENTS.get(name, (None, None))
    texts = load_texts(name, start=start, stop=stop, data_dir=data_dir)
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
