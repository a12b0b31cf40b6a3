"""Quality benchmark: obs_compress against llm-compressor on the same model, data and evaluation.

Every method runs in one process on SmolLM2-135M-Instruct (or ``--model``), each from a fresh
copy of the dense model loaded from its folder, with the *identical* calibration tensors and
the same evaluation, by the protocol of ``../shared/data/README.md``:

* calibration: C4 documents ``[0:1000]``, 128 samples of 512 tokens drawn with
  ``random.Random(0)`` (:func:`obs_compress.data.calibration_samples`), built once; the token
  digest must be ``c8664533313406d0`` (SmolLM2 tokenizer);
* evaluation: perplexity on the first 40 WikiText-2 and 20 C4 windows of 1024 tokens, fp32
  (:func:`obs_compress.evaluate.perplexity`; digests ``f9431c1508d7d212`` / ``612e66f88def2961``).

Methods (``--methods``):

==============  ====================================================================
dense           the unpruned model
magnitude       ours, ``method: magnitude`` with a layer-wide threshold (``allocation: layer``),
                from the weights alone (``calibration.source: none``, as magnitude-50.yaml)
wanda           llm-compressor ``WandaPruningModifier``
sparsegpt       llm-compressor ``SparseGPTModifier`` (its defaults: block_size 128,
                dampening_frac 0.01)
obd             ours, ``method: obd`` (recipe defaults otherwise)
obs_blockwise   ours, the shipped ``obs_blockwise`` recipe for the pattern, uniform sparsity
                (``recipes/obs-50.yaml``, ``obs-2of4.yaml``, ``obs-70.yaml``): what the
                main job and a user who takes a shipped recipe run
best            ours, the best recipe we have for the pattern (``--best-recipe``; default
                the shipped ones: OWL, ``recipes/obs-70-owl.yaml``, no longer beats them).
                Where it is the ``obs_blockwise`` recipe, that row is reused (``same_as``)
==============  ====================================================================

Patterns (``--patterns``): ``50%`` unstructured, ``2:4`` and ``70%``; ``--sweep`` adds 60% and
80% for the main methods (``--sweep-methods``) and plots perplexity against sparsity.

How llm-compressor is driven (0.14): the calibration tensors become a ``datasets.Dataset``
with ``input_ids`` and ``attention_mask`` columns, which its ``oneshot`` takes as already
tokenized, and::

    llmcompressor.oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifier,
                          num_calibration_samples=n_samples, max_seq_length=seq_len,
                          shuffle_calibration_samples=False, batch_size=1)

with ``modifier = SparseGPTModifier(sparsity=s, mask_structure="0:0" | "2:4",
block_size=128, dampening_frac=0.01, targets=<the decoder block class, e.g.
LlamaDecoderLayer>, ignore=["re:.*lm_head"])`` (``WandaPruningModifier`` likewise without the
two solver fields). Its default ``sequential`` pipeline runs block by block like ours;
``shuffle_calibration_samples=False`` keeps the samples in our order (its default shuffles
with the unseeded global RNG, which only changes the float rounding of the Hessian sums).

Measurements per method: prune wall time (``time.perf_counter`` around the prune call only:
model loading and evaluation are outside it) and its CPU time (``getrusage``); peak resident
memory during the prune: the kernel's high-water mark ``VmHWM`` of ``/proc/self/status``,
reset to the current RSS before each prune by writing ``5`` to ``/proc/self/clear_refs``
(where that is refused: a thread sampling ``VmRSS`` every 10 ms). ``peak_rss_mib`` is the
process's peak (the loaded model, tokenizer and data included), ``peak_rss_delta_mib`` that
peak minus the RSS just before the prune. The achieved sparsity of the decoder Linears (and
for N:M, whether every group holds) is checked after each prune, and the load average is
recorded, since timings on a shared machine mean little without it.

Outputs, rewritten as each method finishes (so a killed run loses one method at most):
``OUT.json`` (every figure, machine, versions, protocol digests), ``OUT.md`` (the table,
the check against the README's llm-compressor figures, and the issue's targets) and, when
a sweep has data, ``OUT.png``. ``--resume`` skips the (method, pattern) pairs already in
``OUT.json``; without it an existing ``OUT.json`` is refused unless ``--overwrite``.

A full run takes hours on a 2-core CPU (each llm-compressor method 6-13 minutes to prune,
3.5 minutes to evaluate); run it in the background and resume it when interrupted::

    nohup python tools/bench_quality.py --out docs/bench_quality.json \\
        > bench_quality.log 2>&1 &
    nohup python tools/bench_quality.py --out docs/bench_quality.json --sweep --resume \\
        >> bench_quality.log 2>&1 &          # add the 60/80% sweep and the plot

    python tools/bench_quality.py --quick --out /tmp/bench_quick.json   # smoke test, < 10 min

``--quick``: 16 calibration samples of 256 tokens, 4 windows of each evaluation set, one
pattern (50%) and the methods dense, sparsegpt and obs_blockwise. Its figures do not compare
with the protocol's.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from obs_compress.data import (CALIBRATION_DOCUMENTS, DATA_DIR_ENV, EVALUATION_N_WINDOWS,
                               EVALUATION_WINDOW)
from obs_compress.errors import InvalidArgument
from obs_compress.export.inspection import nm_holds
from obs_compress.math.masks import Pattern as MaskPattern
from obs_compress.math.masks import parse_pattern
from obs_compress.model.blocks import find_block_stack, find_layers
from obs_compress.recipe import NO_CALIBRATION, CalibrationSettings

logger = logging.getLogger("bench_quality")

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"

# ---- The protocol (../shared/data/README.md) ---------------------------------------------------
# The package's own protocol constants and recipe calibration defaults, under local names.
PROTOCOL_N_SAMPLES = CalibrationSettings.n_samples
PROTOCOL_SEQ_LEN = CalibrationSettings.seq_len
PROTOCOL_SEED = CalibrationSettings.seed
EVAL_WINDOW = EVALUATION_WINDOW
PROTOCOL_WINDOWS = EVALUATION_N_WINDOWS
# Token digests of the protocol for the SmolLM2 tokenizer.
PROTOCOL_DIGESTS = {"calibration": "c8664533313406d0", "wikitext2": "f9431c1508d7d212",
                    "c4": "612e66f88def2961"}
EVAL_SETS = ("wikitext2", "c4")

# Reference figures (WikiText-2, C4) measured with an independent implementation and with
# llm-compressor 0.14.0.1 on this protocol (README "Reference figures for the peer").
REFERENCE = {
    ("dense", "dense"): (24.14, 30.80),
    ("magnitude", "50%"): (539.6, 455.8),
    ("wanda", "50%"): (53.73, 63.68),
    ("wanda", "2:4"): (192.5, 213.8),
    ("sparsegpt", "50%"): (48.60, 57.50),
    ("sparsegpt", "2:4"): (93.30, 107.4),
    ("sparsegpt", "70%"): (309.9, 289.7),
}

# Issue 4's targets: the best method's WikiText-2 perplexity increase over dense must be at
# least this fraction smaller than llm-compressor SparseGPT's.
TARGET_REDUCTION = {"50%": 0.10, "2:4": 0.15, "70%": 0.20}

# ---- Methods and patterns -------------------------------------------------------------------------
DENSE = "dense"
OURS = ("magnitude", "obd", "obs_blockwise")  # method names of prune_weight
LLMCOMPRESSOR = ("wanda", "sparsegpt")
BEST = "best"
METHOD_ORDER = (DENSE, "magnitude", "wanda", "sparsegpt", "obd", "obs_blockwise", BEST)
METHOD_LABELS = {
    DENSE: "dense",
    "magnitude": "magnitude (ours, layer threshold, no data)",
    "wanda": "Wanda (llm-compressor)",
    "sparsegpt": "SparseGPT (llm-compressor)",
    "obd": "OBD (ours)",
    "obs_blockwise": "obs_blockwise (ours)",
    BEST: "best recipe (ours)",
}
DEFAULT_PATTERNS = ("50%", "2:4", "70%")
SWEEP_SPARSITIES = ("50%", "60%", "70%", "80%")
DEFAULT_SWEEP_METHODS = ("magnitude", "wanda", "sparsegpt", "obs_blockwise", BEST)
SHIPPED_RECIPES = {"50%": "obs-50.yaml", "2:4": "obs-2of4.yaml", "70%": "obs-70.yaml"}
# OWL (recipes/obs-70-owl.yaml) beat the uniform 70% recipe until the refit's conjugate
# gradient was preconditioned by [H^-1]_KK (1f9b677); since then uniform is better on both sets
# (209.90 / 198.38 against 210.63 / 210.21), so the shipped recipes are the best ones.
DEFAULT_BEST_RECIPES = dict(SHIPPED_RECIPES)

QUICK = {"n_samples": 16, "seq_len": 256, "n_windows": 4, "patterns": ("50%",),
         "methods": (DENSE, "sparsegpt", "obs_blockwise")}

MIB = 1024 * 1024


class BenchError(RuntimeError):
    """A benchmark run cannot go on (bad arguments, a protocol mismatch, an existing output)."""


@dataclass(frozen=True)
class Pattern:
    """A benchmark pattern: ``"50%"`` (unstructured) or ``"2:4"`` (N:M), with the package's
    own pattern (:class:`obs_compress.math.masks.Pattern`) as its layout."""

    name: str
    sparsity: float
    layout: MaskPattern = MaskPattern()  # unstructured unless N:M

    @property
    def is_nm(self) -> bool:
        return self.layout.is_nm

    @property
    def n(self) -> int:
        return self.layout.n

    @property
    def m(self) -> int:
        return self.layout.m

    @property
    def recipe_pattern(self) -> str:
        return str(self.layout)


def parse_bench_pattern(text: str) -> Pattern:
    """``"50%"`` -> 50% unstructured; ``"2:4"`` -> 2:4 (sparsity 1 - N/M)."""
    text = text.strip()
    percent = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
    if percent:
        sparsity = float(percent.group(1)) / 100
        if not 0 < sparsity < 1:
            raise BenchError(f"pattern {text!r}: the sparsity must be between 0% and 100%")
        return Pattern(text, sparsity)
    try:
        layout = parse_pattern(text)
    except InvalidArgument as exc:
        raise BenchError(f"pattern {text!r}: write a percentage ('50%') or N:M ('2:4'); {exc}") \
            from None
    if not layout.is_nm:
        raise BenchError(f"pattern {text!r}: write a percentage ('50%') or N:M ('2:4')")
    return Pattern(str(layout), layout.sparsity, layout)  # "2 : 4" is named "2:4"


# ---- Machine, versions ----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError):
        memory_gib = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory_gib, 1) if memory_gib else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


CODE_PATHS = ("obs_compress", "kernels", "recipes", "tools", "pyproject.toml")


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        # The code that runs, not the results this script writes into docs/.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                *CODE_PATHS], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{'+dirty' if dirty else ''}" if commit else None


def versions() -> dict[str, Any]:
    import obs_compress

    return {
        "obs_compress": obs_compress.__version__,
        "obs_compress_git": _git_commit(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "llmcompressor": _version("llmcompressor"),
        "compressed_tensors": _version("compressed-tensors"),
        "datasets": _version("datasets"),
    }


# ---- Memory -----------------------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so the next baseline is honest."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRss:
    """Peak resident memory over a ``with`` block, in MiB.

    Resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and reads
    ``VmHWM`` at the end; where the reset is refused, a thread samples ``VmRSS`` every 10 ms.
    """

    SAMPLE_SECONDS = 0.01

    def __init__(self) -> None:
        self.method = ""
        self.peak_mib: float | None = None
        self.before_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled_kib = 0

    @staticmethod
    def reset_high_water_mark() -> bool:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return _status_kib("VmHWM") is not None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled_kib = max(self._sampled_kib, _status_kib("VmRSS") or 0)
            self._stop.wait(self.SAMPLE_SECONDS)

    def __enter__(self) -> "PeakRss":
        self.before_mib = current_rss_mib()
        if self.reset_high_water_mark():
            self.method = "VmHWM of /proc/self/status, reset via /proc/self/clear_refs"
        else:
            self.method = f"VmRSS of /proc/self/status sampled every {self.SAMPLE_SECONDS * 1e3:g} ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sampled_kib = max(self._sampled_kib, _status_kib("VmRSS") or 0)
            self.peak_mib = self._sampled_kib / 1024
        else:
            kib = _status_kib("VmHWM")
            self.peak_mib = kib / 1024 if kib is not None else None


# ---- Data -------------------------------------------------------------------------------------------


@dataclass
class ProtocolData:
    calibration: torch.Tensor  # (n_samples, seq_len) int64
    windows: dict[str, torch.Tensor]  # name -> (n_windows, window) int64
    description: dict[str, Any]


def build_protocol_data(tokenizer, *, n_samples: int, seq_len: int, n_windows: dict[str, int],
                        check_digests: bool, data_dir: Path | None = None) -> ProtocolData:
    """The calibration tensors and evaluation windows, built once, with their digests, from
    the shared files in ``data_dir`` (None: ``$OBS_COMPRESS_DATA_DIR``)."""
    from obs_compress.data import (calibration_samples, evaluation_windows, load_texts,
                                   protocol_texts, token_digest)

    texts = load_texts("c4", start=CALIBRATION_DOCUMENTS[0], stop=CALIBRATION_DOCUMENTS[1],
                       data_dir=data_dir)
    calibration = calibration_samples(tokenizer, texts, n_samples=n_samples, seq_len=seq_len,
                                      seed=PROTOCOL_SEED)
    windows = {name: evaluation_windows(tokenizer, protocol_texts(name, data_dir=data_dir),
                                        window=EVAL_WINDOW,
                                        n_windows=n_windows[name]) for name in EVAL_SETS}
    digests = {"calibration": token_digest(calibration),
               **{name: token_digest(ids) for name, ids in windows.items()}}
    is_protocol = {"calibration": (n_samples, seq_len) == (PROTOCOL_N_SAMPLES, PROTOCOL_SEQ_LEN),
                   **{name: n_windows[name] == PROTOCOL_WINDOWS[name] for name in EVAL_SETS}}
    for key, digest in digests.items():
        if check_digests and is_protocol[key] and digest != PROTOCOL_DIGESTS[key]:
            raise BenchError(f"{key} tokens have digest {digest}, not the protocol's "
                             f"{PROTOCOL_DIGESTS[key]}: another tokenizer or data file? "
                             "(--model with another tokenizer: pass --no-digest-check)")
        logger.info("%s tokens: digest %s%s", key, digest,
                    " (protocol: match)" if is_protocol[key] and digest == PROTOCOL_DIGESTS[key]
                    else "")
    description = {
        "calibration": {"source": "c4", "documents": list(CALIBRATION_DOCUMENTS),
                        "n_samples": n_samples, "seq_len": seq_len, "seed": PROTOCOL_SEED,
                        "digest": digests["calibration"]},
        "evaluation": {name: {"n_windows": n_windows[name], "window": EVAL_WINDOW,
                              "predicted_tokens": n_windows[name] * (EVAL_WINDOW - 1),
                              "digest": digests[name]} for name in EVAL_SETS},
        "is_protocol": all(is_protocol.values()),
    }
    return ProtocolData(calibration, windows, description)


# ---- Models -----------------------------------------------------------------------------------------


def load_dense(folder: Path) -> nn.Module:
    """A fresh fp32 copy of the dense model from its folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


def block_class_names(model: nn.Module) -> list[str]:
    """The class names of the model's decoder blocks (e.g. LlamaDecoderLayer): llm-compressor's
    ``targets``, the same blocks our driver walks."""
    return sorted({type(block).__name__ for block in find_block_stack(model).modules})


def _decoder_layers(model: nn.Module) -> list:
    """Every prunable layer (Linear, Conv1D) inside the decoder blocks, as the driver sees it."""
    stack = find_block_stack(model)
    return [layer for index, block in enumerate(stack.modules)
            for layer in find_layers(block, stack.block_name(index))]


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable layer (Linear, Conv1D) inside the decoder blocks, by name."""
    return {layer.name: layer.module for layer in _decoder_layers(model)}


def sparsity_check(model: nn.Module, pattern: Pattern | None) -> dict[str, Any]:
    """Achieved sparsity of the decoder's prunable layers, and whether an N:M pattern holds
    in every one (along the input axis)."""
    zeros = total = 0
    per_layer = []
    nm_ok = True
    for layer in _decoder_layers(model):
        weight = layer.weight_matrix().detach()  # (d_out, d_in), Conv1D too
        layer_zeros = int((weight == 0).sum())
        zeros += layer_zeros
        total += weight.numel()
        per_layer.append(layer_zeros / weight.numel())
        if pattern is not None and pattern.is_nm:
            nm_ok &= nm_holds(weight, pattern.layout, axis=1)
    check = {"sparsity": zeros / total if total else 0.0,
             "layer_sparsity_min": min(per_layer, default=0.0),
             "layer_sparsity_max": max(per_layer, default=0.0),
             "n_layers": len(per_layer)}
    if pattern is not None and pattern.is_nm:
        check["nm_ok"] = nm_ok
    return check


# ---- Methods ----------------------------------------------------------------------------------------


def resolve_best_recipe(pattern: Pattern, best_recipes: dict[str, Path]):
    """The recipe of the ``best`` method for ``pattern``, forced to its sparsity and pattern.

    An exact entry of ``best_recipes`` wins; an unstructured sparsity without one (the sweep's
    60%, 80%) takes the unstructured entry with the nearest sparsity (ties: the higher one).
    """
    from obs_compress.recipe import load_recipe

    path = best_recipes.get(pattern.name) or best_recipes.get("*")
    if path is None and not pattern.is_nm:
        unstructured = [(parse_bench_pattern(name), p) for name, p in best_recipes.items()
                        if name != "*" and not parse_bench_pattern(name).is_nm]
        if unstructured:
            path = min(unstructured, key=lambda item: (abs(item[0].sparsity - pattern.sparsity),
                                                       -item[0].sparsity))[1]
    if path is None:
        raise BenchError(f"no best recipe for pattern {pattern.name}; pass "
                         f"--best-recipe {pattern.name}=PATH")
    recipe = load_recipe(path)
    updates = []
    if recipe.pattern != pattern.recipe_pattern:
        updates.append(f"pattern={pattern.recipe_pattern!r}")
    if not pattern.is_nm and not math.isclose(recipe.sparsity, pattern.sparsity):
        updates.append(f"sparsity={pattern.sparsity}")
    if updates:
        logger.info("best recipe %s for %s: setting %s", path, pattern.name, ", ".join(updates))
        recipe = recipe.with_updates(updates)
    return Path(path), recipe


def our_recipe(method: str, pattern: Pattern):
    from obs_compress.recipe import load_recipe

    if method == "obs_blockwise":
        return resolve_best_recipe(pattern, {name: RECIPES_DIR / file
                                             for name, file in SHIPPED_RECIPES.items()})[1]
    data: dict[str, Any] = {"method": method, "pattern": pattern.recipe_pattern}
    if not pattern.is_nm:
        data["sparsity"] = pattern.sparsity
    if method == "magnitude":
        data["allocation"] = "layer"  # one threshold over the whole layer
        # From the weights alone, as magnitude-50.yaml runs: its time is not a forward pass.
        data["calibration"] = {"source": NO_CALIBRATION}
    return load_recipe(data)


def prune_ours(model: nn.Module, recipe, calibration: torch.Tensor, *,
               batch_size: int) -> dict[str, Any]:
    """``recipe`` on ``model`` with the shared calibration tensors, or with no data at all
    when the recipe asks for none (magnitude)."""
    from obs_compress.api import oneshot

    dataset = None if recipe.calibration.source == NO_CALIBRATION else calibration
    report = oneshot(model, recipe, dataset, device="cpu", batch_size=batch_size,
                     progress=False)
    return {"report_seconds": report.seconds, "report_global_sparsity": report.global_sparsity}


def llmcompressor_modifier(method: str, pattern: Pattern, model: nn.Module):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    common = {
        "sparsity": pattern.sparsity,
        "mask_structure": f"{pattern.n}:{pattern.m}" if pattern.is_nm else "0:0",
        "targets": block_class_names(model),  # the decoder blocks, pruned Linear by Linear
        "ignore": ["re:.*lm_head"],
    }
    if method == "sparsegpt":
        return SparseGPTModifier(**common, block_size=128, dampening_frac=0.01)
    return WandaPruningModifier(**common)


def calibration_dataset(calibration: torch.Tensor):
    """Our calibration tensors as the tokenized ``datasets.Dataset`` llm-compressor takes."""
    from datasets import Dataset

    ids = calibration.tolist()
    return Dataset.from_dict({"input_ids": ids,
                              "attention_mask": [[1] * len(row) for row in ids]})


def prune_llmcompressor(model: nn.Module, tokenizer, modifier, dataset, *,
                        n_samples: int, seq_len: int) -> dict[str, Any]:
    import torch.fx._symbolic_trace as fx_trace
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    # llm-compressor's sequential pipeline autowraps the model's forward in a copied module
    # namespace holding the model ("self") and registers it through torch.fx.wrap in the
    # global `_wrapped_fns_to_patch`, which then keeps every pruned model alive; drop the
    # entries it adds, so that models are freed between methods and the RSS figures of later
    # methods do not carry earlier models.
    wrapped_before = set(fx_trace._wrapped_fns_to_patch)
    try:
        oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifier,
                num_calibration_samples=n_samples, max_seq_length=seq_len,
                shuffle_calibration_samples=False, batch_size=1)
    finally:
        reset_session()  # the global session holds the model too
        for key in set(fx_trace._wrapped_fns_to_patch) - wrapped_before:
            del fx_trace._wrapped_fns_to_patch[key]
    return {}


# ---- Results ----------------------------------------------------------------------------------------


def result_key(row: dict[str, Any]) -> tuple[str, str]:
    return row["method"], row["pattern"]


class ResultStore:
    """``OUT.json``: ``{"meta": ..., "results": [...]}``, rewritten atomically after each row."""

    def __init__(self, path: Path, meta: dict[str, Any], results: list[dict[str, Any]]):
        self.path = path
        self.meta = meta
        self.results = results

    @classmethod
    def open(cls, path: Path, meta: dict[str, Any], *, resume: bool,
             overwrite: bool) -> "ResultStore":
        if path.exists() and not resume and not overwrite:
            raise BenchError(f"{path} exists: pass --resume to continue it or --overwrite to "
                             "start over")
        if not (resume and path.exists()):
            return cls(path, meta, [])
        old = json.loads(path.read_text())
        if old["meta"].get("model") != meta["model"]:
            raise BenchError(f"{path} was measured on {old['meta'].get('model')}, not "
                             f"{meta['model']}; use another --out")
        if old["meta"].get("protocol") != meta["protocol"]:
            raise BenchError(f"{path} was measured with other tokens "
                             f"({protocol_summary(old['meta'].get('protocol'))}; now "
                             f"{protocol_summary(meta['protocol'])}); use another --out")
        if old["meta"].get("versions", {}).get("llmcompressor") != meta["versions"]["llmcompressor"]:
            raise BenchError(f"{path} was measured with llmcompressor "
                             f"{old['meta']['versions'].get('llmcompressor')}; use another --out")
        merged = dict(old["meta"])
        merged["resumed"] = merged.get("resumed", []) + [meta["started"]]
        merged["versions"] = meta["versions"]
        merged["machine"] = meta["machine"]
        return cls(path, merged, old["results"])

    def done(self) -> set[tuple[str, str]]:
        return {result_key(row) for row in self.results}

    def add(self, row: dict[str, Any]) -> None:
        self.results = [r for r in self.results if result_key(r) != result_key(row)] + [row]
        self.meta["updated"] = now_iso()
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "results": self.results}, indent=1,
                                  default=str) + "\n")
        os.replace(tmp, self.path)


def protocol_summary(protocol: dict[str, Any] | None) -> str:
    if not protocol:
        return "none recorded"
    calibration = protocol["calibration"]
    parts = [f"calibration {calibration['n_samples']}x{calibration['seq_len']} "
             f"{calibration['digest']}"]
    parts += [f"{name} {e['n_windows']}x{e['window']} {e['digest']}"
              for name, e in protocol["evaluation"].items()]
    return ", ".join(parts)


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


# ---- Report -----------------------------------------------------------------------------------------


def _pattern_sort_key(name: str) -> tuple[int, float]:
    if name == DENSE:
        return (0, 0.0)
    pattern = parse_bench_pattern(name)
    return (2, pattern.sparsity) if pattern.is_nm else (1, pattern.sparsity)


def _sorted(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {method: i for i, method in enumerate(METHOD_ORDER)}
    return sorted(results, key=lambda r: (_pattern_sort_key(r["pattern"]),
                                          order.get(r["method"], 99)))


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return f"{value:,.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"


def _gap(value: float | None, dense: float | None) -> str:
    if value is None or dense is None or not math.isfinite(value):
        return "–"
    return f"{(value / dense - 1) * 100:+.1f}%"


def _find(results: list[dict[str, Any]], method: str, pattern: str) -> dict[str, Any] | None:
    return next((r for r in results if r["method"] == method and r["pattern"] == pattern), None)


def target_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 4's targets, as far as the results reach."""
    dense = _find(results, DENSE, DENSE)
    rows = []
    for pattern, needed in TARGET_REDUCTION.items():
        sparsegpt = _find(results, "sparsegpt", pattern)
        ours = _find(results, BEST, pattern) or _find(results, "obs_blockwise", pattern)
        if dense and sparsegpt and ours:
            base = dense["wikitext2_ppl"]
            ours_increase = ours["wikitext2_ppl"] - base
            peer_increase = sparsegpt["wikitext2_ppl"] - base
            reduction = 1 - ours_increase / peer_increase if peer_increase > 0 else None
            rows.append({"target": f"{pattern}: WikiText-2 increase over dense at least "
                                   f"{needed:.0%} smaller than SparseGPT's",
                         "ours": ours["method"],
                         "measured": f"{ours_increase:.2f} vs {peer_increase:.2f} "
                                     f"({_fmt(100 * reduction, 1) if reduction is not None else '–'}% smaller)",
                         "met": reduction is not None and reduction >= needed})
        blockwise = _find(results, "obs_blockwise", pattern)
        if sparsegpt and blockwise and blockwise.get("prune_seconds") and sparsegpt.get("prune_seconds"):
            rows.append({"target": f"{pattern}: obs_blockwise prune time at most SparseGPT's",
                         "ours": "obs_blockwise",
                         "measured": f"{blockwise['prune_seconds']:.1f} s vs "
                                     f"{sparsegpt['prune_seconds']:.1f} s",
                         "met": blockwise["prune_seconds"] <= sparsegpt["prune_seconds"]})
    return rows


def markdown_report(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    results = _sorted(results)
    dense = _find(results, DENSE, DENSE)
    dense_ppl = {name: dense[f"{name}_ppl"] if dense else None for name in EVAL_SETS}
    protocol = meta["protocol"]
    calibration = protocol["calibration"]
    evaluation = protocol["evaluation"]
    machine = meta["machine"]
    ver = meta["versions"]
    lines = ["# Quality benchmark: obs_compress and llm-compressor on the same work", ""]
    if not protocol["is_protocol"]:
        lines += ["**Quick / non-protocol run**: the figures do not compare with the protocol's "
                  "or the README's reference figures.", ""]
    lines += [
        f"Generated by `tools/bench_quality.py` (see its docstring to rerun). Model: "
        f"`{meta['model']}`. Started {meta['started']}, last updated {meta.get('updated', '–')}.",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores "
        f"({machine['cores_usable']} usable, torch threads {machine['torch_threads']}), "
        f"{machine['memory_gib']} GiB; {machine['platform']}",
        f"- Versions: obs_compress {ver['obs_compress']} (git {ver['obs_compress_git']} in the "
        "latest run; each row's own commit in the code column, – where not recorded), "
        f"llmcompressor {ver['llmcompressor']} (compressed-tensors {ver['compressed_tensors']}), "
        f"torch {ver['torch']}, transformers {ver['transformers']}",
        f"- Calibration: C4 documents {calibration['documents'][0]}–{calibration['documents'][1]}, "
        f"{calibration['n_samples']} × {calibration['seq_len']} tokens, seed "
        f"{calibration['seed']} (digest `{calibration['digest']}`), the same tensors for "
        "every method",
        "- Evaluation: " + ", ".join(
            f"{name} {e['n_windows']} × {e['window']} tokens (digest `{e['digest']}`)"
            for name, e in evaluation.items()) + ", fp32",
        f"- Prune time: wall clock of the prune call alone; peak RSS: {meta['memory_method']}",
        "",
        "| method | pattern | WikiText-2 ppl | vs dense | C4 ppl | vs dense | prune s | "
        "prune CPU s | peak RSS MiB (+ over start) | sparsity | load avg | code |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in results:
        sparsity = row.get("sparsity")
        sparsity_text = "–" if sparsity is None else f"{sparsity:.3f}"
        if row.get("nm_ok") is False:
            sparsity_text += " (N:M broken)"
        peak = row.get("peak_rss_mib")
        delta = row.get("peak_rss_delta_mib")
        peak_text = ("–" if peak is None else f"{peak:,.0f}" if delta is None
                     else f"{peak:,.0f} (+{delta:,.0f})")
        load = row.get("loadavg_during")
        label = METHOD_LABELS.get(row["method"], row["method"]) + (" †" if row.get("note") else "")
        lines.append(
            f"| {label} | "
            f"{'–' if row['pattern'] == DENSE else row['pattern']} | "
            f"{_fmt(row['wikitext2_ppl'])} | {_gap(row['wikitext2_ppl'], dense_ppl['wikitext2'])} | "
            f"{_fmt(row['c4_ppl'])} | {_gap(row['c4_ppl'], dense_ppl['c4'])} | "
            f"{_fmt(row.get('prune_seconds'), 1)} | {_fmt(row.get('prune_cpu_seconds'), 1)} | "
            f"{peak_text} | {sparsity_text} | {_fmt(load, 1)} | "
            f"{row.get('obs_compress_git') or '–'} |")

    noted = [row for row in results if row.get("note")]
    if noted:
        lines += [""] + [f"† {METHOD_LABELS.get(r['method'], r['method'])} {r['pattern']}: "
                         f"{r['note']}" for r in noted]

    if protocol["is_protocol"]:
        checks = [(key, ref, _find(results, *key)) for key, ref in REFERENCE.items()]
        checks = [(key, ref, row) for key, ref, row in checks if row]
        if checks:
            lines += ["", "## Check against the README's reference figures", "",
                      "Measured here vs the figures of `../shared/data/README.md` "
                      "(dense: independent implementation; peers: llm-compressor 0.14.0.1).", "",
                      "| method | pattern | WikiText-2 (ref) | C4 (ref) |",
                      "| --- | --- | ---: | ---: |"]
            for (method, pattern), ref, row in checks:
                lines.append(
                    f"| {METHOD_LABELS.get(method, method)} | {pattern} | "
                    f"{_fmt(row['wikitext2_ppl'])} ({_fmt(ref[0])}, "
                    f"{_gap(row['wikitext2_ppl'], ref[0])}) | "
                    f"{_fmt(row['c4_ppl'])} ({_fmt(ref[1])}, {_gap(row['c4_ppl'], ref[1])}) |")

    targets = target_rows(results)
    if targets:
        lines += ["", "## Targets of issue 4", "",
                  "Ours: the `best` recipe where measured, else `obs_blockwise`.", "",
                  "| target | ours | measured (ours vs SparseGPT) | met |",
                  "| --- | --- | --- | --- |"]
        for row in targets:
            lines.append(f"| {row['target']} | {row['ours']} | {row['measured']} | "
                         f"{'yes' if row['met'] else 'NO'} |")
    plot = meta.get("plot")
    if plot:
        lines += ["", "## Perplexity against sparsity", "", f"![perplexity vs sparsity]({plot})"]
    return "\n".join(lines) + "\n"


def plot_sweep(results: list[dict[str, Any]], path: Path, methods: tuple[str, ...]) -> bool:
    """Perplexity (log scale) against unstructured sparsity, one line per method; False: no data."""
    series = {}
    for method in methods:
        points = sorted((parse_bench_pattern(r["pattern"]).sparsity, r)
                        for r in results if r["method"] == method and r["pattern"].endswith("%"))
        if len(points) >= 2:
            series[method] = points
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = _find(results, DENSE, DENSE)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, name, title in zip(axes, EVAL_SETS, ("WikiText-2", "C4")):
        for method, points in series.items():
            ax.plot([100 * s for s, _ in points], [r[f"{name}_ppl"] for _, r in points],
                    marker="o", label=METHOD_LABELS.get(method, method))
        if dense:
            ax.axhline(dense[f"{name}_ppl"], color="grey", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity of the decoder Linears (%)")
        ax.set_ylabel(f"{title} perplexity (log)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_reports(store: ResultStore, sweep_methods: tuple[str, ...]) -> None:
    png = store.path.with_suffix(".png")
    if plot_sweep(store.results, png, sweep_methods):
        store.meta["plot"] = png.name
        store.save()
    store.path.with_suffix(".md").write_text(markdown_report(store.meta, store.results))


# ---- The run ----------------------------------------------------------------------------------------


@dataclass
class Job:
    method: str
    pattern: Pattern | None  # None: dense


def plan_jobs(methods: tuple[str, ...], patterns: tuple[Pattern, ...],
              sweep: tuple[Pattern, ...], sweep_methods: tuple[str, ...]) -> list[Job]:
    jobs: list[Job] = []
    if DENSE in methods or sweep:
        jobs.append(Job(DENSE, None))
    for pattern in patterns:
        jobs += [Job(m, pattern) for m in methods if m != DENSE]
    for pattern in sweep:
        if pattern.name in {p.name for p in patterns}:
            continue
        jobs += [Job(m, pattern) for m in sweep_methods if m != DENSE]
    return jobs


@contextmanager
def _timed() -> Iterator[dict[str, float]]:
    times: dict[str, float] = {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    try:
        yield times
    finally:
        times["wall"] = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        times["cpu"] = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)


def evaluate(model: nn.Module, windows: dict[str, torch.Tensor]) -> dict[str, Any]:
    from obs_compress.evaluate import perplexity

    row: dict[str, Any] = {}
    start = time.perf_counter()
    for name, ids in windows.items():
        result = perplexity(model, ids, batch_size=1)
        row[f"{name}_ppl"] = result.perplexity
        row[f"{name}_nll"] = result.mean_nll
    row["eval_seconds"] = time.perf_counter() - start
    return row


def run_job(job: Job, *, folder: Path, tokenizer, data: ProtocolData, dataset_cache: dict,
            best_recipes: dict[str, Path], batch_size: int) -> dict[str, Any]:
    release_memory()
    model = load_dense(folder)
    row: dict[str, Any] = {"method": job.method,
                           "pattern": job.pattern.name if job.pattern else DENSE,
                           "label": METHOD_LABELS.get(job.method, job.method),
                           "started": now_iso(), "loadavg_before": os.getloadavg()[0],
                           "obs_compress_git": _git_commit()}
    row["rss_loaded_mib"] = current_rss_mib()
    if job.method != DENSE:
        pattern = job.pattern
        assert pattern is not None
        if job.method in LLMCOMPRESSOR:
            modifier = llmcompressor_modifier(job.method, pattern, model)
            row["modifier"] = {"class": type(modifier).__name__,
                               **modifier.model_dump(exclude_none=True, mode="json",
                                                     include={"sparsity", "mask_structure",
                                                              "block_size", "dampening_frac",
                                                              "targets", "ignore"})}
            if "dataset" not in dataset_cache:
                dataset_cache["dataset"] = calibration_dataset(data.calibration)
            n_samples, seq_len = data.calibration.shape

            def prune() -> dict[str, Any]:
                return prune_llmcompressor(model, tokenizer, modifier, dataset_cache["dataset"],
                                           n_samples=n_samples, seq_len=seq_len)
        else:
            if job.method == BEST:
                path, recipe = resolve_best_recipe(pattern, best_recipes)
                row["recipe_file"] = str(path)
            else:
                recipe = our_recipe(job.method, pattern)
            row["recipe"] = recipe.to_dict()
            calibration = row["recipe"].pop("calibration")  # the calibration tensors are given
            if calibration["source"] == NO_CALIBRATION:
                row["calibration"] = NO_CALIBRATION

            def prune() -> dict[str, Any]:
                return prune_ours(model, recipe, data.calibration, batch_size=batch_size)

        logger.info("%s %s: pruning", job.method, pattern.name)
        with PeakRss() as memory, _timed() as times:
            row.update(prune())
        row["prune_seconds"] = times["wall"]
        row["prune_cpu_seconds"] = times["cpu"]
        row["peak_rss_mib"] = memory.peak_mib
        row["rss_before_mib"] = memory.before_mib
        if memory.peak_mib is not None and memory.before_mib is not None:
            row["peak_rss_delta_mib"] = memory.peak_mib - memory.before_mib
        row["memory_method"] = memory.method
        row["loadavg_during"] = os.getloadavg()[0]
        row.update(sparsity_check(model, pattern))
        logger.info("%s %s: pruned in %.1f s (peak RSS %.0f MiB), sparsity %.4f",
                    job.method, pattern.name, row["prune_seconds"], memory.peak_mib or -1,
                    row["sparsity"])
    else:
        row.update(sparsity_check(model, None))
    logger.info("%s %s: evaluating", job.method, row["pattern"])
    row.update(evaluate(model, data.windows))
    row["finished"] = now_iso()
    logger.info("%s %s: WikiText-2 %.3f, C4 %.3f (eval %.0f s)", job.method, row["pattern"],
                row["wikitext2_ppl"], row["c4_ppl"], row["eval_seconds"])
    del model
    release_memory()
    return row


def reused_row(job: Job, results: list[dict[str, Any]],
               best_recipes: dict[str, Path]) -> dict[str, Any] | None:
    """For ``best``: a copy of the ``obs_blockwise`` row of the pattern when the best recipe
    is that same recipe (the same run twice would only measure noise); else None."""
    if job.method != BEST or job.pattern is None:
        return None
    blockwise = _find(results, "obs_blockwise", job.pattern.name)
    if blockwise is None:
        return None
    from obs_compress.recipe import load_recipe

    path, recipe = resolve_best_recipe(job.pattern, best_recipes)
    recipe_data = recipe.to_dict()
    recipe_data.pop("calibration", None)  # given as tensors, not part of the comparison
    # Through the schema, so that a field added since the row was written takes its default.
    if "recipe" not in blockwise or load_recipe(blockwise["recipe"]) != load_recipe(recipe_data):
        return None
    logger.info("best %s: recipe %s is the obs_blockwise recipe; reusing that row",
                job.pattern.name, path)
    return {**blockwise, "method": BEST, "label": METHOD_LABELS.get(BEST, BEST),
            "recipe_file": str(path), "same_as": "obs_blockwise"}


def parse_best_recipes(values: list[str] | None) -> dict[str, Path]:
    if not values:
        return {name: RECIPES_DIR / file for name, file in DEFAULT_BEST_RECIPES.items()}
    recipes: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        try:
            pattern = parse_bench_pattern(name) if sep else None
        except BenchError:  # an '=' in a path, not PATTERN=PATH
            pattern = None
        if pattern is not None:
            recipes[pattern.name] = Path(path)
        else:
            recipes["*"] = Path(value)
    for path in recipes.values():
        if not path.is_file():
            raise BenchError(f"best recipe {path} does not exist")
    return recipes


def _method_list(text: str, option: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHOD_ORDER]
    if unknown:
        raise BenchError(f"{option}: unknown method(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(METHOD_ORDER)}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_quality.py",
        description="Prune one model with obs_compress and llm-compressor on identical "
                    "calibration tensors; compare perplexity, prune time and peak memory.",
        epilog="A full run takes hours on a small CPU: run it with nohup and --resume it.")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "bench_quality.json",
                        help="results JSON; the Markdown table and the plot go beside it "
                             "(same name, .md / .png); default %(default)s")
    parser.add_argument("--model", type=Path, default=None,
                        help="Hugging Face folder of a causal LM (default: SmolLM2-135M-Instruct, "
                             "converted once into .cache/models)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder holding the shared c4/ and wikitext2/ files "
                             f"(default: ${DATA_DIR_ENV})")
    parser.add_argument("--methods", default=",".join(METHOD_ORDER),
                        help="comma-separated, from: " + ", ".join(METHOD_ORDER))
    parser.add_argument("--patterns", default=",".join(DEFAULT_PATTERNS),
                        help="comma-separated: percentages (unstructured) or N:M; "
                             "default %(default)s")
    parser.add_argument("--sweep", action="store_true",
                        help="also run 60%% and 80%% (with 50%% and 70%%) for --sweep-methods and "
                             "plot perplexity against sparsity")
    parser.add_argument("--sweep-methods", default=",".join(DEFAULT_SWEEP_METHODS),
                        help="methods of the sweep; default %(default)s")
    parser.add_argument("--best-recipe", action="append", metavar="[PATTERN=]PATH",
                        help="recipe of the 'best' method, per pattern (e.g. 2:4=recipes/x.yaml) "
                             "or for all; default recipes/obs-50.yaml, obs-2of4.yaml, "
                             "obs-70.yaml")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['n_samples']} calibration samples of {QUICK['seq_len']} "
                             f"tokens, {QUICK['n_windows']} windows per evaluation set, pattern "
                             f"50%%, methods {', '.join(QUICK['methods'])} (unless given)")
    parser.add_argument("--n-samples", type=int, default=None, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=None, help="calibration sample length")
    parser.add_argument("--n-windows", type=int, default=None,
                        help="windows per evaluation set (default: the protocol's 40 and 20)")
    parser.add_argument("--resume", action="store_true",
                        help="skip the (method, pattern) pairs already in --out")
    parser.add_argument("--overwrite", action="store_true", help="start --out over")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="calibration samples per forward in our driver")
    parser.add_argument("--no-digest-check", action="store_true",
                        help="do not require the protocol's token digests (other tokenizers)")
    parser.add_argument("--verbose", action="store_true", help="debug logging, llm-compressor's too")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:
        # llm-compressor (loguru) reads this when imported; its per-layer METRIC lines are
        # level 38, so ERROR keeps them out.
        os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _run(args, parser)
    except BenchError as exc:
        parser.error(str(exc))  # exits with status 2


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = _method_list(args.methods, "--methods")
    pattern_text = args.patterns
    if args.quick:
        if args.methods == parser.get_default("methods"):
            methods = QUICK["methods"]
        if args.patterns == parser.get_default("patterns"):
            pattern_text = ",".join(QUICK["patterns"])
    patterns = tuple(parse_bench_pattern(p) for p in pattern_text.split(",") if p.strip())
    sweep_methods = _method_list(args.sweep_methods, "--sweep-methods")
    sweep = tuple(parse_bench_pattern(p) for p in SWEEP_SPARSITIES) if args.sweep else ()
    n_samples = args.n_samples or (QUICK["n_samples"] if args.quick else PROTOCOL_N_SAMPLES)
    seq_len = args.seq_len or (QUICK["seq_len"] if args.quick else PROTOCOL_SEQ_LEN)
    n_windows = ({name: args.n_windows for name in EVAL_SETS} if args.n_windows else
                 {name: QUICK["n_windows"] for name in EVAL_SETS} if args.quick else
                 dict(PROTOCOL_WINDOWS))
    best_recipes = parse_best_recipes(args.best_recipe)
    jobs = plan_jobs(methods, patterns, sweep, sweep_methods)
    if any(job.method in LLMCOMPRESSOR for job in jobs) and _version("llmcompressor") is None:
        raise BenchError("llmcompressor is not installed: pip install -e '.[bench]'")

    if args.model is None:
        from convert_gguf import ensure_smollm2

        folder = ensure_smollm2()
        model_name = "SmolLM2-135M-Instruct"
    else:
        folder = args.model.expanduser().resolve()
        model_name = str(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = build_protocol_data(tokenizer, n_samples=n_samples, seq_len=seq_len,
                               n_windows=n_windows, data_dir=args.data_dir,
                               check_digests=args.model is None and not args.no_digest_check)
    meta = {"started": now_iso(), "model": model_name, "quick": args.quick,
            "machine": machine_info(), "versions": versions(), "protocol": data.description,
            "memory_method": ("VmHWM of /proc/self/status, reset via /proc/self/clear_refs "
                              "before each prune" if PeakRss.reset_high_water_mark() else
                              f"VmRSS sampled every {PeakRss.SAMPLE_SECONDS * 1e3:g} ms"),
            "llmcompressor_call": "llmcompressor.oneshot(model=model, tokenizer=tokenizer, "
                                  "dataset=Dataset({input_ids, attention_mask}), recipe=modifier, "
                                  "num_calibration_samples=n_samples, max_seq_length=seq_len, "
                                  "shuffle_calibration_samples=False, batch_size=1)"}
    store = ResultStore.open(args.out, meta, resume=args.resume, overwrite=args.overwrite)
    done = store.done()
    todo = [job for job in jobs
            if (job.method, job.pattern.name if job.pattern else DENSE) not in done]
    logger.info("%d jobs, %d already done, %d to run: %s", len(jobs), len(jobs) - len(todo),
                len(todo), ", ".join(f"{j.method}@{j.pattern.name if j.pattern else DENSE}"
                                     for j in todo))
    store.save()
    dataset_cache: dict[str, Any] = {}
    for index, job in enumerate(todo, start=1):
        logger.info("[%d/%d] %s %s", index, len(todo), job.method,
                    job.pattern.name if job.pattern else "")
        row = reused_row(job, store.results, best_recipes)
        if row is None:
            row = run_job(job, folder=folder, tokenizer=tokenizer, data=data,
                          dataset_cache=dataset_cache, best_recipes=best_recipes,
                          batch_size=args.batch_size)
        store.add(row)
        write_reports(store, sweep_methods)
    write_reports(store, sweep_methods)
    print(store.path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
