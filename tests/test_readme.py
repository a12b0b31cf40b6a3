"""The README's examples run as written.

Every ```python block of README.md runs, unchanged, in a fresh checkout's layout: a
temporary folder holding ``recipes/`` (the repository's, calibrating on 8 x 64 tokens instead
of 128 x 512), ``../shared/data`` (the data folder) and
``.cache/models/SmolLM2-135M-Instruct``, which here is the tiny Llama of ``_tiny_models.py``
(the real model would take half an hour). Names a block leaves to the
reader (``weight``, ``d_in``, ``calibration_batches``) are bound to small tensors; any
other undefined name, a wrong call or a missing file fails the test. Every ``obs-compress``
command of the ```bash blocks names only subcommands and flags that its ``--help`` lists,
and every repository path the bash blocks name exists.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from _tiny_models import save_tiny
from obs_compress.cli import main
from obs_compress.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.DOTALL | re.MULTILINE)
PYTHON_BLOCKS = [body for language, body in BLOCK.findall(README) if language == "python"]
BASH_BLOCKS = [body for language, body in BLOCK.findall(README) if language == "bash"]


def test_the_readme_has_the_blocks_these_tests_read():
    assert len(PYTHON_BLOCKS) >= 2 and len(BASH_BLOCKS) >= 2


@pytest.fixture
def checkout(tmp_path, data_dir, monkeypatch):
    """A fresh checkout's layout, with a tiny model where SmolLM2 would be; the cwd."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    root = tmp_path / "obs_compress"
    (root / "recipes").mkdir(parents=True)
    for recipe in (REPO / "recipes").glob("*.yaml"):  # the shipped ones, on a tiny calibration
        small = load_recipe(recipe).with_updates(["calibration.n_samples=8",
                                                  "calibration.seq_len=64"])
        (root / "recipes" / recipe.name).write_text(small.to_yaml(), encoding="utf-8")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data_dir)
    save_tiny(root / ".cache" / "models" / "SmolLM2-135M-Instruct", "llama")
    monkeypatch.chdir(root)
    monkeypatch.delenv("OBS_COMPRESS_DATA_DIR", raising=False)  # the block names its folder
    return root


def stand_ins() -> dict:
    """What the README leaves to the reader: one layer's weight and its inputs."""
    generator = torch.Generator().manual_seed(0)
    d_in = 24
    return {"d_in": d_in, "weight": torch.randn(16, d_in, generator=generator),
            "calibration_batches": [torch.randn(4, 10, d_in, generator=generator)
                                    for _ in range(3)]}


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(checkout, index):
    namespace = {"__name__": "__readme__", **stand_ins()}
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)

    # What the blocks claim, checked where they did it.
    if "result" in namespace:  # one layer: half its weights zero, and the mask says which
        result = namespace["result"]
        assert result.mask.float().mean().item() == pytest.approx(0.5)
        assert torch.equal(result.weight == 0, result.mask)
    for config in (checkout / "out").glob("*/config.json"):  # a written folder is complete
        from transformers import AutoModelForCausalLM

        section = json.loads(config.read_text())["sparsity"]
        assert section["pattern"] is not None and section["sparsity"] is not None
        assert (config.parent / "recipe.yaml").is_file()
        assert (config.parent / "tokenizer.json").is_file()
        AutoModelForCausalLM.from_pretrained(config.parent)


def shell_commands(prefix: str) -> list[list[str]]:
    """The bash blocks' command lines that start with ``prefix``, continuations joined,
    comments dropped, split as the shell would."""
    commands = []
    for body in BASH_BLOCKS:
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # VAR=value before the command
            if words and words[0] == prefix:
                commands.append(words)
    return commands


def help_text(*command: str) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    return output.getvalue()


def test_every_obs_compress_command_of_the_readme_exists():
    commands = shell_commands("obs-compress")
    assert len(commands) >= 4
    top = help_text()
    for words in commands:
        subcommand = words[1]
        assert re.search(rf"^\s+{subcommand}\s", top, re.MULTILINE), (subcommand, top)
        known = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", help_text(subcommand)))
        for word in words[2:]:
            for flag in re.findall(r"(?:^|[\[|])(--[a-z][\w-]*)", word):
                assert flag in known, f"README: `obs-compress {subcommand} {flag}` is unknown"


def test_every_path_the_bash_blocks_name_exists():
    named = set()
    for body in BASH_BLOCKS:
        named.update(re.findall(r"(?<![\w./-])((?:recipes|tools|\.ci)/[\w./-]*\w)", body))
    assert named
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert not missing, f"README names {missing}"
