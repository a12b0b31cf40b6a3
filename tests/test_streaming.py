"""Streaming from disk equals the in-memory path byte for byte; a killed run resumes to the
same bytes; refusals name what is wrong. Also the one writer against safetensors itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _tiny_models import folder_digest, save_tiny, tiny_model, write_text_file
from obs_compress.api import prune_checkpoint
from obs_compress.cli import EXIT_ERROR, main
from obs_compress.errors import ModelLoadError
from obs_compress.export.checkpoint import REPORT_NAME
from obs_compress.export.progress import MANIFEST_NAME, ResumeRefused, in_progress_folder

OBS = {"method": "obs_blockwise", "sparsity": 0.5, "calibration": {"n_samples": 4, "seq_len": 48}}
RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def weights_and_config(folder):
    """Every file's bytes but the report (its timings differ between any two runs)."""
    return {name: data for name, data in folder_digest(folder).items() if name != REPORT_NAME}


def run(source, out, calibration, recipe=OBS, **kwargs):
    return prune_checkpoint(source, recipe, out, dataset=str(calibration), device="cpu",
                            progress=False, **kwargs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("shard", ["2GB", "40KB"])
def test_streaming_equals_in_memory_byte_for_byte(tmp_path, family, shard):
    source = save_tiny(tmp_path / "source", family, layers=3)
    before = folder_digest(source)
    calibration = write_text_file(tmp_path / "cal.jsonl")
    streamed = run(source, tmp_path / "streamed", calibration, max_shard_size=shard)
    loaded = run(source, tmp_path / "loaded", calibration, max_shard_size=shard, streaming=False)
    assert streamed.report.path == "streaming"
    assert loaded.report.path.startswith("in-memory")
    # nothing of the model is held at the end: the blocks and (once the first block's inputs
    # were captured) the embeddings and head went back to the meta device
    assert all(p.is_meta for p in streamed.model.parameters())
    assert json.loads((tmp_path / "streamed" / REPORT_NAME).read_text())["path"] == "streaming"
    files = weights_and_config(tmp_path / "streamed")
    assert files == weights_and_config(tmp_path / "loaded")
    shards = [name for name in files if name.endswith(".safetensors")]
    assert (len(shards) == 1) == (shard == "2GB") and shards
    assert [s.to_dict() | {"seconds": 0} for s in streamed.report.layers] == \
        [s.to_dict() | {"seconds": 0} for s in loaded.report.layers]
    assert folder_digest(source) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.jsonl", "loaded", "source",
                                                          "streamed"]  # nothing left beside


def test_streaming_magnitude_without_data_and_a_requested_dtype(tmp_path):
    source = save_tiny(tmp_path / "source", "llama", layers=2)
    recipe = {"method": "magnitude", "sparsity": 0.5, "calibration": {"source": "none"}}
    for name, streaming in (("streamed", None), ("loaded", False)):
        prune_checkpoint(source, recipe, tmp_path / name, device="cpu", progress=False,
                         dtype="bfloat16", streaming=streaming)
    assert weights_and_config(tmp_path / "streamed") == weights_and_config(tmp_path / "loaded")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "streamed" / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16


def test_gpt2_checkpoint_without_the_base_model_prefix(tmp_path):
    """Old GPT-2 checkpoints store ``h.0.attn...`` for the model's ``transformer.h.0...``."""
    from safetensors.torch import save_file

    source = save_tiny(tmp_path / "source", "gpt2", layers=2)
    model = tiny_model("gpt2", layers=2)
    state = {name.removeprefix("transformer."): tensor.contiguous()
             for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    calibration = write_text_file(tmp_path / "cal.jsonl")
    streamed = run(source, tmp_path / "streamed", calibration)
    assert streamed.report.path == "streaming"
    from transformers import GPT2LMHeadModel

    reread = GPT2LMHeadModel.from_pretrained(tmp_path / "streamed")
    weight = reread.transformer.h[1].mlp.c_fc.weight
    assert (weight == 0).float().mean() == 0.5
    assert torch.equal(reread.transformer.wte.weight, model.transformer.wte.weight)
    assert reread.lm_head.weight.data_ptr() == reread.transformer.wte.weight.data_ptr()


def test_a_missing_parameter_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    source = save_tiny(tmp_path / "source", "llama", layers=2)
    state = load_file(str(source / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    calibration = write_text_file(tmp_path / "cal.jsonl")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*random"):
        run(source, tmp_path / "out", calibration)
    assert not (tmp_path / "out").exists()


def test_the_writer_writes_what_safetensors_writes(tmp_path):
    """The one writer's files against safetensors' own ``save_file``, byte for byte."""
    from safetensors.torch import save_file

    from obs_compress.export.shards import write_safetensors

    generator = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(5, 7, generator=generator),
               "a.bias": torch.randn(3, generator=generator),
               "c.odd": torch.randn(1, 13, generator=generator), "d.empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    write_safetensors(tmp_path / "mine.safetensors",
                      {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()},
                      tensors.__getitem__)
    assert ((tmp_path / "mine.safetensors").read_bytes()
            == (tmp_path / "theirs.safetensors").read_bytes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.safetensors",
                                                          "theirs.safetensors"]


def test_read_tensor_reads_what_safetensors_stored_and_refuses_a_truncated_file(tmp_path):
    from safetensors.torch import save_file

    from obs_compress.errors import CheckpointFormatError
    from obs_compress.export.shards import read_tensor

    generator = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(3, 5, generator=generator),
               "h": torch.randn(7, generator=generator).to(torch.bfloat16),
               "m": torch.rand(2, 3, generator=generator) > 0.5, "e": torch.zeros(0, 2)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    for name, tensor in tensors.items():
        read = read_tensor(path, name)
        assert read.dtype == tensor.dtype and read.shape == tensor.shape
        assert read.view(-1).view(torch.uint8).numpy().tobytes() == (
            tensor.view(-1).view(torch.uint8).numpy().tobytes())
    data = path.read_bytes()
    path.write_bytes(data[:-4])  # the last tensor of the data loses its last bytes
    with pytest.raises(CheckpointFormatError, match="tensor . ends past the end.*truncated"):
        for name in tensors:
            read_tensor(path, name)


def test_the_writer_fills_shards_in_place_to_the_bytes_of_a_whole_write(tmp_path):
    """Block by block, with a second writer restored from the first's record halfway (a
    resumed run): the same files as one whole write, each tensor written once, no staging."""
    from obs_compress.export.shards import (PARTIAL_SUFFIX, STAGING_DIR, ShardWriter,
                                            checkpoint_layout)

    model = tiny_model("llama", layers=3)
    layout = checkpoint_layout(model, 40_000)
    assert layout.is_sharded
    state = model.state_dict()
    whole = tmp_path / "whole"
    whole.mkdir()
    writer = ShardWriter(whole, layout)
    writer.add(state, label="all")
    writer.finish()
    blocks = [{n: t for n, t in state.items() if not n.startswith("model.layers.")}]
    blocks += [{n: t for n, t in state.items() if n.startswith(f"model.layers.{i}.")}
               for i in range(3)]
    parts = tmp_path / "parts"
    parts.mkdir()
    first = ShardWriter(parts, layout)
    for block in blocks[:2]:
        first.add(block, label="x")
    assert first.filling and all((parts / (f + PARTIAL_SUFFIX)).is_file() for f in first.filling)
    second = ShardWriter(parts, layout)
    second.restore(first.staged, first.written, first.filling)
    for block in blocks[2:]:
        second.add(block, label="x")
    second.finish()
    assert not second.filling and not second.staged and not (parts / STAGING_DIR).exists()
    assert sorted(p.name for p in parts.iterdir()) == sorted(p.name for p in whole.iterdir())
    for path in whole.iterdir():
        assert (parts / path.name).read_bytes() == path.read_bytes()


# --------------------------------------------------------------------------- resume

# The CLI with a pause injected at one moment of the run (the library has no test switch):
# at the N-th call of the hooked function it says PAUSED and sleeps, and the test kills it.
PAUSING_CLI = """
import sys
import time

import obs_compress.api as api
import obs_compress.driver as driver
import obs_compress.export.shards as shards

moment, count, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]


def pause_at(n):
    calls[0] += 1
    if calls[0] == n:
        print("PAUSED", file=sys.stderr, flush=True)
        time.sleep(600)


def hooked(module, name, before):
    original = getattr(module, name)

    def wrapper(*a, **k):
        if before:
            pause_at(count)
        result = original(*a, **k)
        if not before:
            pause_at(count)
        return result

    setattr(module, name, wrapper)


if moment == "calibration":  # tokens sampled, no block started
    hooked(api.Calibration, "input_ids", before=False)
elif moment == "solve":  # inside a block, before one of its solves
    hooked(driver, "prune_weight", before=True)
elif moment == "write":  # a safetensors file half written
    hooked(shards, "tensor_bytes", before=True)
elif moment == "filled":  # a shard filled in place and renamed, not yet recorded
    hooked(shards, "file_sha256", before=True)
from obs_compress.cli import main

sys.exit(main(args))
"""


def prune_args(source, out, calibration, *extra):
    return ["prune", "--model", str(source), "--recipe", os.path.join(RECIPES, "obs-50.yaml"),
            "--out", str(out), "--dataset", str(calibration), "--set", "calibration.n_samples=4",
            "--set", "calibration.seq_len=48", "--device", "cpu", "--no-progress",
            "--max-shard-size", "40KB", *extra]


def kill_when_paused(command):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 180
        seen = []
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            seen.append(line)
            if "PAUSED" in line or not line:
                break
        assert "PAUSED" in seen[-1], "".join(seen)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    return "".join(seen)


def kill_paused_run(tmp_path, moment, count, args):
    """The CLI run with ``args``, killed at the ``count``-th call of ``moment``'s function
    (the pausing runner stays in ``tmp_path``)."""
    runner = tmp_path / "pausing_cli.py"
    runner.write_text(PAUSING_CLI, encoding="utf-8")
    return kill_when_paused([sys.executable, str(runner), moment, str(count), *args])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted streaming run of the tiny Llama (3 blocks)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    source = save_tiny(tmp_path / "source", "llama", layers=3)
    calibration = write_text_file(tmp_path / "cal.jsonl")
    assert main(prune_args(source, tmp_path / "out", calibration)) == 0
    return source, calibration, weights_and_config(tmp_path / "out")


@pytest.mark.parametrize("moment, count, finished", [
    ("calibration", 1, 0),
    ("solve", 6, 1),  # 4 solves a block (q/k/v, o, gate/up, down): block 2's second
    ("write", 20, None),  # the 20th tensor's bytes: into block 1 or 2, mid-file
    ("filled", 1, None),  # the first shard completed in place
])
def test_killed_run_resumes_to_the_same_bytes(tmp_path, reference, moment, count, finished,
                                              capsys):
    source, calibration, expected = reference
    out = tmp_path / "out"
    kill_paused_run(tmp_path, moment, count, prune_args(source, out, calibration))
    assert not out.exists()  # nothing looks finished
    work = in_progress_folder(out)
    if moment == "calibration":  # killed before any block: nothing to keep yet
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pausing_cli.py"]
        blocks_done = 0
    else:
        blocks_done = json.loads((work / MANIFEST_NAME).read_text())["blocks_done"]
        if finished is not None:
            assert blocks_done == finished
        if moment == "filled":  # completed, renamed, but still recorded as being filled
            from obs_compress.export.shards import PARTIAL_SUFFIX

            filling = json.loads((work / MANIFEST_NAME).read_text())["filling"]
            assert any((work / f).is_file() and not (work / (f + PARTIAL_SUFFIX)).exists()
                       for f in filling)
        assert sorted(p.name for p in tmp_path.iterdir()) == [work.name, "pausing_cli.py"]
        capsys.readouterr()
        assert main(prune_args(source, out, calibration)) == EXIT_ERROR  # not without --resume
        assert "--resume" in capsys.readouterr().err and work.is_dir()
    assert main(prune_args(source, out, calibration, "--resume")) == 0
    assert weights_and_config(out) == expected
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["resumed_at_block"] == (blocks_done or None)
    assert len(report["layers"]) == 21
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pausing_cli.py"]


def test_resume_with_another_recipe_or_calibration_is_refused(tmp_path, reference, capsys):
    source, calibration, expected = reference
    out = tmp_path / "out"
    kill_paused_run(tmp_path, "solve", 6, prune_args(source, out, calibration))
    capsys.readouterr()
    assert main(prune_args(source, out, calibration, "--resume",
                           "--set", "sparsity=0.6")) == EXIT_ERROR
    error = capsys.readouterr().err
    assert "recipe" in error and "sparsity: 0.5 there, 0.6 now" in error
    other = write_text_file(tmp_path / "other.jsonl", seed=1)
    with pytest.raises(ResumeRefused, match="calibration"):
        prune_checkpoint(source, os.path.join(RECIPES, "obs-50.yaml"), out, dataset=str(other),
                         device="cpu", progress=False, resume=True, max_shard_size="40KB")
    assert main(prune_args(source, out, calibration, "--resume")) == 0  # still resumable
    assert weights_and_config(out) == expected


def test_resume_refuses_a_changed_tensor_in_a_shard_being_filled(tmp_path, reference, capsys):
    from obs_compress.export.shards import PARTIAL_SUFFIX, read_header

    source, calibration, expected = reference
    out = tmp_path / "out"
    kill_paused_run(tmp_path, "solve", 6, prune_args(source, out, calibration))
    work = in_progress_folder(out)
    filling = json.loads((work / MANIFEST_NAME).read_text())["filling"]
    shard, digests = next(iter(filling.items()))
    partial = work / (shard + PARTIAL_SUFFIX)
    name = next(iter(digests))
    with partial.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
    start = read_header(partial)[name]["data_offsets"][0]
    data = bytearray(partial.read_bytes())
    data[8 + length + start] ^= 0xFF
    partial.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(prune_args(source, out, calibration, "--resume")) == EXIT_ERROR
    error = capsys.readouterr().err
    assert partial.name in error and "differs from what the progress record holds" in error
    assert work.is_dir() and not out.exists()
