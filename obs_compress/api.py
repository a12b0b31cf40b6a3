"""The Python API: prune a loaded model in place, or a checkpoint into a new folder.

* :func:`oneshot` prunes an already loaded ``PreTrainedModel`` in place with a recipe and
  calibration data, and returns a :class:`~obs_compress.report.PruneReport`.
* :func:`save_pretrained` writes it as a Hugging Face folder (atomic, sparsity in
  ``config.json``, recipe and report beside it).
* :func:`prune_checkpoint` is the whole job of ``obs-compress prune``: load, prune, save.

Calibration data (``dataset``) is any of: ``None`` (the recipe's ``calibration.source``),
a source name or file (``"c4"``, ``"wikitext2"``, ``"hub:c4"``, ``"self"``,
``.txt``/``.json``/``.jsonl``/``.parquet``), a list of documents, or token ids
``(n_samples, seq_len)`` used as given. :func:`select_calibration` decides which, once,
where a run starts; the driver then receives token ids, or nothing for the source
``"none"`` (magnitude only: no forward runs, and the report has no reconstruction loss).
Text is tokenized and sampled by the protocol of ``../shared/data/README.md``; the names
``c4`` and ``wikitext2`` are read from the data folder (``data_dir``, else
``$OBS_COMPRESS_DATA_DIR``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .data import EVALUATION_WINDOW, calibration_samples, load_texts, self_generated_texts
from .driver import prune_model
from .errors import InvalidArgument
from .evaluate import PerplexityResult, evaluate_protocol
from .export.checkpoint import check_output_dir, check_shard_size
from .export.checkpoint import load_pretrained as _load_pretrained
from .export.checkpoint import save_pretrained as _save_pretrained
from .inference import sparse_inference as _sparse_inference
from .model.loading import LoadedModel, load_model
from .plan import build_plan, check_runs_without_data
from .recipe import NO_CALIBRATION, CalibrationSettings, Recipe, load_recipe
from .report import PruneReport

logger = logging.getLogger(__name__)

SELF_SOURCE = "self"


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``"auto"``: the GPU when there is one, else the CPU; ``None``: leave the model be."""
    if device is None:
        return None
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class Calibration:
    """A run's calibration data, as :func:`select_calibration` decided it.

    Exactly one of: ``token_ids`` (given as such), ``documents`` (given as a list of
    strings), or ``source`` (a name, a file, ``"self"`` or ``"none"``).
    """

    settings: CalibrationSettings
    source: str | None = None
    documents: tuple[str, ...] | None = None
    token_ids: torch.Tensor | None = None

    @property
    def is_none(self) -> bool:
        """No calibration data at all: magnitude pruning from the weights alone."""
        return self.source == NO_CALIBRATION

    def input_ids(self, *, tokenizer: Any = None, model: nn.Module | None = None,
                  data_dir: str | os.PathLike | None = None) -> torch.Tensor:
        """The calibration token ids ``(n_samples, seq_len)``, int64."""
        settings = self.settings
        if self.token_ids is not None:
            return self.token_ids
        if self.is_none:
            raise InvalidArgument(f"calibration source {NO_CALIBRATION!r} gives no calibration "
                                  "data; name a source (c4, wikitext2, self or a file)")
        if tokenizer is None:
            raise InvalidArgument("calibrating on text needs a tokenizer: pass tokenizer=..., or "
                                  "give token ids (n_samples, seq_len) as the dataset")
        if self.documents is not None:
            texts = list(self.documents)
        elif self.source == SELF_SOURCE:
            if model is None:
                raise InvalidArgument("--dataset self needs the model to generate text")
            logger.info("generating %d calibration texts with the model itself",
                        settings.n_samples)
            texts = self_generated_texts(model, tokenizer, n_texts=settings.n_samples,
                                         max_new_tokens=settings.seq_len * 3 // 2 + 16,
                                         seed=settings.seed)
        else:
            texts = load_texts(self.source, start=settings.start, stop=settings.stop,
                               data_dir=data_dir)
        return calibration_samples(tokenizer, texts, n_samples=settings.n_samples,
                                   seq_len=settings.seq_len, seed=settings.seed)


def select_calibration(dataset: Any, settings: CalibrationSettings) -> Calibration:
    """Decide what calibrates a run: ``dataset`` as given, or the recipe's source when None."""
    if isinstance(dataset, Calibration):
        return dataset
    if isinstance(dataset, torch.Tensor):
        if dataset.ndim != 2 or dataset.is_floating_point() or dataset.numel() == 0:
            raise InvalidArgument("calibration token ids must be an integer tensor (n_samples, "
                                  f"seq_len), got {tuple(dataset.shape)} {dataset.dtype}")
        return Calibration(settings, token_ids=dataset.to(torch.int64))
    if dataset is None:
        return Calibration(settings, source=settings.source)
    if isinstance(dataset, (str, os.PathLike)):
        return Calibration(settings, source=os.fspath(dataset))
    if isinstance(dataset, Sequence) and all(isinstance(text, str) for text in dataset):
        return Calibration(settings, documents=tuple(dataset))
    raise InvalidArgument("dataset must be a source name or file, a list of documents, or "
                          f"token ids (n_samples, seq_len); got {type(dataset).__name__}")


def calibration_input_ids(dataset: Any, *, tokenizer: Any, calibration: CalibrationSettings,
                          model: nn.Module | None = None,
                          data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Calibration token ids ``(n_samples, seq_len)`` from any accepted ``dataset`` form."""
    return select_calibration(dataset, calibration).input_ids(tokenizer=tokenizer, model=model,
                                                              data_dir=data_dir)


def _tokenizer_for(model: nn.Module):
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not name:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # any failure: the caller gets a clear message instead
        logger.warning("could not load a tokenizer from %s (%s)", name, exc)
        return None


def _check_vocabulary(model: nn.Module, input_ids: torch.Tensor) -> None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and int(input_ids.max()) >= vocab:
        raise InvalidArgument(f"calibration token id {int(input_ids.max())} is outside the "
                              f"model's vocabulary ({vocab}); was another tokenizer used?")


def oneshot(model: nn.Module, recipe: Recipe | str | os.PathLike | dict | None = None,
            dataset: Any = None, *, tokenizer: Any = None,
            device: str | torch.device | None = None, batch_size: int = 8,
            sequential: bool | None = None, progress: bool = True,
            data_dir: str | os.PathLike | None = None,
            activations: str = "auto") -> PruneReport:
    """Prune ``model`` in place by ``recipe`` and return the per-layer report.

    A recipe with a ``structured`` section removes whole MLP channels and attention heads and
    then shrinks ``model`` in place (smaller ``nn.Linear`` modules, an updated config): the
    report's ``structure`` says what each block lost and ``parameters`` the counts.

    The recipe is checked against the model (targets, N:M widths) before any weight
    changes. ``device``: where each block runs (``"auto"``, ``"cuda"``, ``"cpu"``; None:
    where the model is); only one block at a time is moved there. ``sequential``: None
    keeps the recipe's. ``data_dir``: the folder of the named data sets (else
    ``$OBS_COMPRESS_DATA_DIR``). An error past the checks (non-finite activations in block
    5, say) leaves the blocks before it pruned: reload the model before trying again.
    ``activations``: where the calibration activations are held between blocks (``auto``,
    ``device``, ``cpu``, ``disk``; :func:`obs_compress.memory_plan.choose_activations`).
    """
    recipe = load_recipe(recipe)
    plan = build_plan(model, recipe)
    calibration = select_calibration(dataset, recipe.calibration)
    model_name = getattr(model, "name_or_path", "") or ""
    if calibration.is_none:  # the driver refuses a plan that needs data
        return prune_model(model, plan, None, progress=progress, model_name=model_name)
    if tokenizer is None and calibration.token_ids is None:
        tokenizer = _tokenizer_for(model)
    input_ids = calibration.input_ids(tokenizer=tokenizer, model=model, data_dir=data_dir)
    _check_vocabulary(model, input_ids)
    logger.info("calibrating on %d samples of %d tokens; pruning %d layers in %d blocks of %s",
                input_ids.shape[0], input_ids.shape[1], len(plan.layers), len(plan.blocks),
                plan.stack.name)
    from .memory_plan import activation_bytes, choose_activations

    device = resolve_device(device)
    held = activation_bytes(model.config, input_ids.shape[0], input_ids.shape[1],
                            next(p.dtype for p in model.parameters()))
    choice = choose_activations(activations, held, str(device) if device is not None
                                and device.type != "cpu" else "cpu")
    logger.info("calibration activations: %s", choice.describe())
    report = prune_model(model, plan, input_ids, device=device, batch_size=batch_size,
                         sequential=sequential, progress=progress, model_name=model_name,
                         activations=choice.placement)
    report.activations = choice.describe()
    if plan.structured is not None:  # drop the masked rows and columns: a smaller model
        from .structured import shrink_pruned_model_

        before, after = shrink_pruned_model_(model, plan, report.structure)
        report.parameters = {"before": before, "after": after}
    return report


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None,
                    source: str | os.PathLike | None = None, recipe: Any = None,
                    report: PruneReport | None = None, overwrite: bool = False,
                    max_shard_size: int | str = "2GB", format: str = "dense",
                    pattern: Any = None) -> Path:
    """Write the (pruned) ``model`` as a Hugging Face folder; see
    :func:`obs_compress.export.checkpoint.save_pretrained`.

    ``recipe``: a recipe, its file or a mapping; when not given, the one ``report`` was
    pruned with (``PruneReport.recipe``), so the folder is as complete as the CLI's:
    ``recipe.yaml`` and a full ``sparsity`` section in ``config.json``.
    """
    if recipe is None and report is not None and report.recipe:
        recipe = report.recipe
    if recipe is not None:
        recipe = load_recipe(recipe)
    return _save_pretrained(model, out_dir, tokenizer=tokenizer, source=source, recipe=recipe,
                            report=report, overwrite=overwrite, max_shard_size=max_shard_size,
                            format=format, pattern=pattern)


def load_pretrained(folder: str | os.PathLike, *, sparse_inference: bool = False,
                    sparse_policy: str = "auto", device: str | torch.device | None = None, dtype: Any = None,
                    allow_pickle: bool = False, trust_remote_code: bool = False) -> LoadedModel:
    """Load a checkpoint folder (one this tool wrote, or any), optionally ready for sparse
    inference.

    ``device``: where the model goes first (``"auto"``: the GPU when there is one; None: it
    stays where it loaded, the CPU). ``sparse_inference=True`` then calls :func:`obs_compress.sparse_inference` on it, so that its pruned layers run the
    sparse products where they are faster; the report of which layer runs which path is
    ``LoadedModel.sparse_inference``. The swap happens after the move because a
    ``SparseLinear``'s storage does not follow ``model.to``.
    """
    if not isinstance(sparse_inference, bool):
        raise InvalidArgument(f"sparse_inference must be True or False, got {sparse_inference!r}")
    loaded = _load_pretrained(folder, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code, dtype=dtype)
    target = resolve_device(device)
    if target is not None:
        loaded.model.to(target)
    if sparse_inference:
        loaded.sparse_inference = _sparse_inference(loaded.model, policy=sparse_policy)
    return loaded


def evaluate_perplexity(model: nn.Module, tokenizer: Any, datasets: Sequence[str], *,
                        device: str | torch.device | None = "auto", n_windows: int | None = None,
                        window: int = EVALUATION_WINDOW, progress: bool = True,
                        data_dir: str | os.PathLike | None = None) -> dict[str, PerplexityResult]:
    """Perplexity of ``model`` on each of ``datasets`` by the protocol
    (:func:`~obs_compress.evaluate.evaluate_protocol`), keyed by name.

    ``device``: where it runs (``"auto"``: the GPU when there is one; None: where the model
    is); the model goes back where it was afterwards. ``n_windows``: the first N windows of
    each set (None: the protocol's counts, every window of a file).
    """
    if tokenizer is None:
        raise InvalidArgument("perplexity is measured on text: the model has no tokenizer "
                              "(no tokenizer files in its folder)")
    target = resolve_device(device)
    parameter = next(model.parameters(), None)
    home = parameter.device if parameter is not None else None
    counts = {name: n_windows for name in datasets} if n_windows else None
    if target is not None:
        model.to(target)
    try:
        return evaluate_protocol(model, tokenizer, datasets, n_windows=counts, window=window,
                                 device=target, progress=progress, data_dir=data_dir)
    finally:
        if target is not None and home is not None:
            model.to(home)


@dataclass
class PruneRun:
    """What :func:`prune_checkpoint` did."""

    report: PruneReport
    out_dir: Path
    model: nn.Module  # a streaming run's is on the meta device: its weights are in out_dir
    tokenizer: Any
    seconds: float
    rank: int = 0  # this process's rank in a multi-process run; rank 0 wrote out_dir


def prune_checkpoint(model: str | os.PathLike, recipe: Recipe | str | os.PathLike | dict | None,
                     out_dir: str | os.PathLike, *, dataset: Any = None,
                     device: str | torch.device | None = "auto", overwrite: bool = False,
                     allow_pickle: bool = False, trust_remote_code: bool = False,
                     dtype: Any = None, batch_size: int = 8, progress: bool = True,
                     max_shard_size: int | str = "2GB",
                     data_dir: str | os.PathLike | None = None, evaluate: Sequence[str] = (),
                     eval_windows: int | None = None, streaming: bool | None = None,
                     resume: bool = False, format: str = "dense",
                     dist_timeout_s: float | None = None,
                     activations: str = "auto") -> PruneRun:
    """Load ``model`` (folder or hub id), prune it by ``recipe``, write it to ``out_dir``.

    The output folder and the calibration choice are checked first, so a refusal comes
    before the work; the source is never modified; nothing is left in ``out_dir`` unless
    the run completes. ``evaluate``: data sets (``wikitext2``, ``c4``, a file) whose
    perplexity is measured before and after pruning (:func:`evaluate_perplexity`, the
    first ``eval_windows`` windows of each) and stored in the report.

    ``streaming``: None (default) streams a local folder of safetensors one block at a time
    (:mod:`obs_compress.stream`) unless the run needs the whole model (``owl``, ``--dataset
    self``, ``evaluate``: the report says why it did not stream); True insists (refused with
    the reason otherwise); False loads the whole model. ``resume``: continue the interrupted
    streaming run of ``out_dir`` from its last finished block (refused if the recipe, model,
    calibration or settings differ). ``format``: how the pruned weights are stored
    (``dense``, ``bitmask``, ``nm``; docs/FORMAT.md), checked before the work.

    Started by ``torchrun`` (``WORLD_SIZE`` > 1), the processes prune together
    (:mod:`obs_compress.distributed`, a process group with ``dist_timeout_s``, default
    :data:`~obs_compress.distributed.DEFAULT_TIMEOUT_S`); that needs the streaming path, and
    only rank 0 writes ``out_dir``.
    """
    from .export.formats import check_format

    check_format(format)
    start = time.perf_counter()
    recipe = load_recipe(recipe)
    if recipe.structured.active and format != "dense":
        raise InvalidArgument(f"format {format} stores unstructured sparsity; structured removal "
                              "writes a smaller dense model: use format dense")
    source = Path(model).expanduser()
    check_output_dir(out_dir, overwrite=overwrite, source=source if source.exists() else None)
    check_shard_size(max_shard_size)
    calibration = select_calibration(dataset, recipe.calibration)
    if calibration.is_none:
        check_runs_without_data(recipe)
    reason = "streaming=False was asked for" if streaming is False else None
    if streaming is not False:
        from .stream import prune_streaming, streaming_refusal

        reason = streaming_refusal(source.resolve() if source.is_dir() else None, recipe,
                                   calibration, evaluate)
        if reason is None:
            from .distributed import DEFAULT_TIMEOUT_S, init_from_environment

            group = init_from_environment(resolve_device(device), timeout_s=dist_timeout_s
                                          if dist_timeout_s is not None else DEFAULT_TIMEOUT_S)
            try:
                report, out, streamed, tokenizer = prune_streaming(
                    source.resolve(), recipe, out_dir, calibration=calibration,
                    device=group.device if group is not None else resolve_device(device),
                    overwrite=overwrite, resume=resume, trust_remote_code=trust_remote_code,
                    dtype=dtype, batch_size=batch_size, progress=progress,
                    max_shard_size=max_shard_size, data_dir=data_dir, format=format,
                    group=group, activations=activations)
            finally:
                if group is not None:
                    group.close()
            return PruneRun(report=report, out_dir=out, model=streamed.model,
                            tokenizer=tokenizer, seconds=time.perf_counter() - start,
                            rank=group.rank if group is not None else 0)
        if streaming:
            raise InvalidArgument(f"cannot stream this run: {reason}")
        logger.info("loading the whole model (not streaming: %s)", reason)
    from .distributed import world_size_from_environment

    if world_size_from_environment() > 1:
        raise InvalidArgument(f"several processes (WORLD_SIZE={world_size_from_environment()}) "
                              f"prune on the streaming path only, and this run loads the whole "
                              f"model ({reason})")
    if resume:
        raise InvalidArgument(f"--resume continues a streaming run, and this one loads the whole "
                              f"model ({reason})")
    loaded = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                        dtype=dtype)
    evaluate = list(evaluate)

    def measure() -> dict[str, PerplexityResult]:
        return evaluate_perplexity(loaded.model, loaded.tokenizer, evaluate, device=device,
                                   n_windows=eval_windows, progress=progress,
                                   data_dir=data_dir) if evaluate else {}

    before = measure()
    report = oneshot(loaded.model, recipe, calibration, tokenizer=loaded.tokenizer,
                     device=device, batch_size=batch_size, progress=progress, data_dir=data_dir,
                     activations=activations)
    report.model = loaded.source
    report.path = f"in-memory ({reason})"
    after = measure()
    report.perplexity = {name: {"before": before[name].perplexity,
                                "after": after[name].perplexity,
                                "n_tokens": after[name].n_tokens} for name in evaluate}
    out = save_pretrained(loaded.model, out_dir, tokenizer=loaded.tokenizer,
                          source=loaded.local_folder, recipe=recipe, report=report,
                          overwrite=overwrite, max_shard_size=max_shard_size, format=format)
    return PruneRun(report=report, out_dir=out, model=loaded.model, tokenizer=loaded.tokenizer,
                    seconds=time.perf_counter() - start)


__all__ = ["Calibration", "PruneRun", "calibration_input_ids", "evaluate_perplexity",
           "load_pretrained", "oneshot",
           "prune_checkpoint", "resolve_device", "save_pretrained", "select_calibration"]
