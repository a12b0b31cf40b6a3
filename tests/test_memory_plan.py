"""`prune --dry-run`: the memory plan from the config and the recipe alone."""

from __future__ import annotations

import json

import pytest

from _tiny_models import folder_digest, tiny_config
from obs_compress.algorithms import solve_bytes
from obs_compress.cli import EXIT_ERROR, main
from obs_compress.memory_plan import plan_memory
from obs_compress.recipe import load_recipe

# Llama-3-70B's published shapes.
LLAMA_3_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
               "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
               "max_position_embeddings": 8192, "tie_word_embeddings": False,
               "dtype": "bfloat16"}


def _config_only(folder, config: dict):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_dry_run_of_a_70b_config_prints_a_plan_and_reads_no_weights(tmp_path, capsys):
    model = _config_only(tmp_path / "llama-3-70b", LLAMA_3_70B)
    before = folder_digest(model)
    report = tmp_path / "plan.json"
    out = tmp_path / "out"
    assert main(["prune", "--model", str(model), "--recipe", "recipes/obs-50.yaml",
                 "--out", str(out), "--dry-run", "--device", "cpu",
                 "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "70,553,706,496 parameters" in printed and "peak CPU memory" in printed
    plan = json.loads(report.read_text(encoding="utf-8"))
    assert plan["parameters"] == 70_553_706_496 and plan["target_layers"] == 80 * 7
    # bf16 output, every tensor once; the activations are 128 x 512 x 8192 in bf16.
    assert plan["items"][-2] == {"what": "the output checkpoint (dense format)",
                                 "where": "disk", "bytes": 70_553_706_496 * 2}
    activations = next(i for i in plan["items"] if i["what"].startswith("calibration"))
    assert activations["bytes"] == 128 * 512 * 8192 * 2
    assert folder_digest(model) == before and not out.exists()


def test_plan_counts_match_the_shapes(tmp_path):
    folder = tmp_path / "tiny"
    tiny_config("llama", layers=3).save_pretrained(folder)  # config.json only
    recipe = load_recipe("recipes/obs-50.yaml").with_updates(
        ["calibration.n_samples=4", "calibration.seq_len=32"])
    plan = plan_memory(folder, recipe, device="cpu", batch_size=2)
    items = {item.what.split(" (")[0]: item.bytes for item in plan.items}
    hidden, intermediate = 64, 128
    assert items["calibration activations"] == 4 * 32 * hidden * 4
    # q, k, v, o, gate, up read the hidden states, down the intermediate ones; fp32.
    assert items["Hessian accumulators of one block"] == (6 * hidden**2 + intermediate**2) * 4
    assert items["the output checkpoint"] == plan.parameters * 4
    # The largest solve is gate_proj's (128 x 64, obs_blockwise at B = 32), by its greedy
    # work, which grows with the rows: the trace (128 * 32 * 12 bytes), the private inverses
    # (128 * 32² fp32) and remove_set's five 128 x 32 x 32 arrays (fp32); beside it H^-1, U
    # and the damped H (3 * 4 * 64²) and the result and mask (128 * 64 * 5). The float64
    # work matrix's peak (8 * 64² + 2 * 4 * 64²) is smaller. Refit is direct at this width.
    greedy = 128 * 32 * 12 + 128 * 32**2 * 4 + 5 * 128 * 32**2 * 4
    assert items["solving gate_proj"] == max(8 * hidden**2 + 2 * 4 * hidden**2,
                                             3 * 4 * hidden**2 + 128 * 64 * 5 + greedy)
    # down_proj (64 x 128), the same way: 64 rows of greedy work at B = 32.
    greedy = 64 * 32 * 12 + 64 * 32**2 * 4 + 5 * 64 * 32**2 * 4
    assert solve_bytes(64, 128, method="obs_blockwise", refit=True, block_size=32) == max(
        8 * intermediate**2 + 2 * 4 * intermediate**2,
        3 * 4 * intermediate**2 + 64 * 128 * 5 + greedy)
    obd = plan_memory(folder, recipe.with_updates(["method=obd", "refit=false"]), device="cpu")
    solving = [item for item in obd.items if item.what.startswith("solving")]
    assert [item.bytes for item in solving] == [intermediate * hidden * (4 + 1)]  # result, mask
    assert plan.peak_cpu_bytes == sum(i.bytes for i in plan.items if i.where == "cpu")
    in_memory = plan_memory(folder, recipe, device="cpu", streaming=False)
    assert in_memory.peak_cpu_bytes > plan.peak_cpu_bytes  # the whole model against one block


def test_plan_without_calibration_holds_no_activations(tmp_path):
    folder = tmp_path / "tiny"
    tiny_config("llama").save_pretrained(folder)
    plan = plan_memory(folder, load_recipe("recipes/magnitude-50.yaml"))
    assert not any("activations" in item.what or "Hessian" in item.what for item in plan.items)


@pytest.mark.parametrize("content", [None, "{not json"])
def test_dry_run_of_a_folder_without_a_readable_config_is_an_error(tmp_path, capsys, content):
    model = tmp_path / "broken"
    model.mkdir()
    if content is not None:
        (model / "config.json").write_text(content, encoding="utf-8")
    assert main(["prune", "--model", str(model), "--recipe", "recipes/obs-50.yaml",
                 "--out", str(tmp_path / "out"), "--dry-run", "--device", "cpu"]) == EXIT_ERROR
    assert f"cannot read the config of {model}" in capsys.readouterr().err
