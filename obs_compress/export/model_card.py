"""The model card (``README.md``, the Hugging Face convention) of every output folder.

It says what was pruned (targets, sparsity, pattern), how (method and the recipe's
settings), with which data (the calibration source, samples and length) and what was
measured (the mean predicted loss, perplexity before and after where the run measured it),
from the ``sparsity`` section of ``config.json``, the recipe and the report. A source model
card is kept: its YAML metadata (license, languages, tags) is carried into the new card's header
and its text follows ours under "Source model card", so nothing of it is lost. No timings go
in, so that two runs giving the same weights give the same card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import yaml

MODEL_CARD_NAME = "README.md"
_TAGS = ("obs_compress", "pruned", "sparse")


def _split_front_matter(text: str) -> tuple[list[str], str]:
    """A card's YAML metadata lines (between the leading ``---`` fences) and its body."""
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        for end in range(1, len(lines)):
            if lines[end].strip() == "---":
                return lines[1:end], "\n".join(lines[end + 1:]).lstrip("\n")
    return [], text


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "not recorded"


def _storage(format: str) -> str:
    if format == "bitmask":
        return ("their weights are stored compressed (format `bitmask`: a packed mask and the "
                "kept values, docs/FORMAT.md)")
    if format == "nm":
        return ("their weights are stored compressed (format `nm`: the kept values of each "
                "group and their positions, docs/FORMAT.md)")
    return f"the zeros are stored in place (format `{format}`)"


def model_card(sparsity: Mapping[str, Any], *, recipe: Mapping[str, Any] | None = None,
               report: Mapping[str, Any] | None = None, source_card: str | None = None,
               source_name: str | None = None, note: str | None = None) -> str:
    """The card's text. ``sparsity``: the config's section; ``recipe``/``report``: their
    dictionaries (``Recipe.to_dict``, ``PruneReport.to_dict``) or None; ``source_card``: the
    source folder's ``README.md`` text, if it had one."""
    metadata_lines, source_body = _split_front_matter(source_card or "")
    try:
        metadata = yaml.safe_load("\n".join(metadata_lines)) if metadata_lines else {}
    except yaml.YAMLError:
        metadata = None
    if not isinstance(metadata, dict):  # metadata YAML cannot read: kept as text, in the body
        source_body = "\n".join(["---", *metadata_lines, "---", source_body])
        metadata = {}
    tags = metadata.get("tags") if isinstance(metadata.get("tags"), list) else []
    metadata = {**metadata, "library_name": "transformers",
                "tags": [*_TAGS, *(tag for tag in tags if tag not in _TAGS)]}
    header = ["---", yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).rstrip(),
              "---", ""]
    recipe = dict(recipe or {})
    calibration = dict(recipe.get("calibration") or {})
    targets = list(sparsity.get("targets") or [])
    lines = [f"# {source_name or 'Model'}, pruned with {sparsity.get('tool', 'obs_compress')}", "",
             "## What was pruned", "",
             f"- {len(targets)} layers of the block stack (embeddings and the output head are "
             f"untouched); {_storage(sparsity.get('format', 'dense'))}.",
             f"- Sparsity asked: {_percent(sparsity.get('sparsity'))}, pattern "
             f"`{sparsity.get('pattern') or 'not recorded'}`; reached over those layers: "
             f"{_percent(sparsity.get('global_sparsity'))}.",
             f"- Per pattern, layers: {json.dumps(sparsity.get('patterns') or {})}.",
             *([f"- {note}"] if note else []), "",
             "## How", "",
             f"- Method `{sparsity.get('method') or 'not recorded'}`."]
    for key in ("allocation", "block_size", "dampening_frac", "refit", "inverse",
                "block_sparsity", "sequential"):
        if key in recipe:
            lines.append(f"- `{key}`: {json.dumps(recipe[key])}")
    if sparsity.get("overrides"):
        lines.append(f"- Overrides: {json.dumps(sparsity['overrides'])}")
    lines += ["", "## Calibration data", ""]
    if calibration:
        lines.append(f"- Source `{calibration.get('source')}`, {calibration.get('n_samples')} "
                     f"samples of {calibration.get('seq_len')} tokens, seed "
                     f"{calibration.get('seed')}.")
    else:
        lines.append("- Not recorded (the model was saved without its recipe).")
    lines += ["", "## What was measured", ""]
    measured = False
    for name, figures in sorted(((report or {}).get("perplexity") or {}).items()):
        lines.append(f"- {name} perplexity: {figures.get('before')} before, "
                     f"{figures.get('after')} after ({figures.get('n_tokens')} tokens).")
        measured = True
    layers = (report or {}).get("layers") or []
    losses = [layer.get("reconstruction_loss") for layer in layers
              if isinstance(layer.get("reconstruction_loss"), (int, float))]
    if losses:
        lines.append(f"- Reconstruction loss on the calibration data, mean over {len(losses)} "
                     f"layers: {sum(losses) / len(losses):.6g} (per layer, with its units, in "
                     "`obs_compress_report.json`).")
        measured = True
    if not measured:
        lines.append("- Nothing: no perplexity was measured and no loss predicted "
                     "(`obs-compress eval --model DIR` measures perplexity).")
    format = sparsity.get("format") or "dense"
    if format == "dense":
        lines += ["", "## Loading", "",
                  "```python",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(\"DIR\")  # no extra code needed",
                  "```", ""]
    else:
        lines += ["", "## Loading", "",
                  f"The pruned weights are stored in the `{format}` format (`quant_method: "
                  "obs_sparse` in `config.json`, docs/FORMAT.md of obs_compress). Import "
                  "obs_compress first: it registers the format with transformers, which then "
                  "decodes the weights as it reads them into a dense model. Without the import, "
                  "transformers does not know the format and initialises those weights at "
                  "random.", "",
                  "```python",
                  "import obs_compress  # registers the obs_sparse format",
                  "from transformers import AutoModelForCausalLM",
                  "model = AutoModelForCausalLM.from_pretrained(\"DIR\")",
                  "```", ""]
    if source_body.strip():
        lines += ["## Source model card", "", source_body.rstrip(), ""]
    return "\n".join(header + lines)


def write_model_card(folder: Path, sparsity: Mapping[str, Any], *, recipe: Any = None,
                     report: Any = None, source: Path | None = None,
                     note: str | None = None) -> None:
    """Write ``folder/README.md`` (the source's card, read from ``source``, folded in)."""
    source_card = None
    if source is not None and (source / MODEL_CARD_NAME).is_file():
        source_card = (source / MODEL_CARD_NAME).read_text(encoding="utf-8", errors="replace")
    recipe_dict = recipe.to_dict() if hasattr(recipe, "to_dict") else recipe
    report_dict = report.to_dict() if hasattr(report, "to_dict") else report
    name = source.name if source is not None else None
    (folder / MODEL_CARD_NAME).write_text(
        model_card(sparsity, recipe=recipe_dict, report=report_dict, source_card=source_card,
                   source_name=name, note=note), encoding="utf-8")
