"""Calibration activations held on the device, in CPU memory or on disk (a memory-mapped
file) give the same output bytes; the automatic choice follows the stated rule; the report
and --dry-run say which was used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _tiny_models import folder_digest, save_tiny, write_text_file
from obs_compress.api import prune_checkpoint
from obs_compress.cli import main
from obs_compress.errors import InvalidArgument
from obs_compress.export.checkpoint import REPORT_NAME
from obs_compress.memory_plan import GIB, choose_activations
from obs_compress.model import activations as activations_module

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "obs-50.yaml"
OBS = {"method": "obs_blockwise", "sparsity": 0.5, "calibration": {"n_samples": 6, "seq_len": 40}}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def weights_and_config(folder):
    return {name: data for name, data in folder_digest(folder).items() if name != REPORT_NAME}


@pytest.mark.parametrize("streaming", [True, False])
def test_disk_and_cpu_held_activations_give_the_same_bytes(tmp_path, monkeypatch, streaming):
    source = save_tiny(tmp_path / "source", "llama", layers=3)
    calibration = write_text_file(tmp_path / "cal.jsonl")
    mapped = []
    original = activations_module.ActivationStore._mapped

    def spy(self, shapes):  # the disk file exists, in the work folder, while blocks run
        views = original(self, shapes)
        mapped.append((self._work, (self._work / activations_module.DISK_FILE).stat().st_size))
        return views

    monkeypatch.setattr(activations_module.ActivationStore, "_mapped", spy)
    outputs = {}
    for placement in ("device", "cpu", "disk"):
        out = tmp_path / placement
        run = prune_checkpoint(source, OBS, out, dataset=str(calibration), device="cpu",
                               progress=False, batch_size=4, activations=placement,
                               streaming=None if streaming else False)
        assert run.report.activations == f"{placement} (asked for)"
        assert json.loads((out / REPORT_NAME).read_text())["activations"] == \
            f"{placement} (asked for)"
        outputs[placement] = weights_and_config(out)
    assert outputs["cpu"] == outputs["device"]
    assert outputs["disk"] == outputs["device"]
    (work, size), = mapped
    assert size == 6 * 40 * 64 * 4  # n_samples x seq_len x hidden, fp32
    if streaming:  # inside the in-progress folder, beside --out
        assert work.parent.name == ".disk.in-progress"
    assert not work.exists()  # removed at the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.jsonl", "cpu", "device", "disk",
                                                         "source"]


def test_the_automatic_choice():
    assert choose_activations("auto", GIB, "cpu", free_cpu=4 * GIB).placement == "device"
    disk = choose_activations("auto", 3 * GIB, "cpu", free_cpu=4 * GIB)
    assert disk.placement == "disk" and "free CPU memory" in disk.reason
    assert choose_activations("auto", GIB, "cuda:0", free_device=2 * GIB,
                              free_cpu=8 * GIB).placement == "device"
    cpu = choose_activations("auto", 3 * GIB, "cuda:0", free_device=4 * GIB, free_cpu=8 * GIB)
    assert cpu.placement == "cpu" and "cuda:0" in cpu.reason
    assert choose_activations("auto", 5 * GIB, "cuda:0", free_device=4 * GIB,
                              free_cpu=8 * GIB).placement == "disk"
    assert choose_activations("disk", 1, "cpu").describe() == "disk (asked for)"
    with pytest.raises(InvalidArgument, match="allowed are auto, device, cpu, disk"):
        choose_activations("gpu", 1, "cpu")


def test_dry_run_says_where_the_activations_go(tmp_path, capsys):
    source = save_tiny(tmp_path / "source", "llama", layers=2)
    report = tmp_path / "plan.json"
    assert main(["prune", "--model", str(source), "--recipe", str(RECIPE),
                 "--out", str(tmp_path / "out"), "--dry-run", "--activations", "disk",
                 "--device", "cpu", "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "note: activations: disk (asked for)" in text
    plan = json.loads(report.read_text())
    item, = [i for i in plan["items"] if i["what"].startswith("calibration activations")]
    assert item["where"] == "disk" and item["bytes"] == 128 * 512 * 64 * 4
    assert not (tmp_path / "out").exists()
