"""Perplexity of a causal language model, and the benchmark protocol's evaluation.

Perplexity = exp(mean next-token negative log-likelihood), the mean taken over every predicted
token of every window: a window of ``T`` tokens predicts ``T - 1`` tokens (token ``t + 1`` from
tokens ``0..t``), and windows are scored independently (no context carried over). This is the
metric of the SparseGPT paper (Frantar & Alistarh 2023, section 4) and of the protocol in
``../shared/data/README.md``: WikiText-2 (40 windows of 1024 tokens) and C4 (20 windows).

Shapes: ``windows: (n_windows, window)`` int64; ``logits: (batch, window, vocab)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from obs_compress.data import (
    EVALUATION_N_WINDOWS,
    EVALUATION_WINDOW,
    evaluation_windows,
    protocol_texts,
    token_digest,
)
from obs_compress.errors import InvalidArgument, NonFiniteError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on a set of windows."""

    perplexity: float  # exp(mean_nll); inf when mean_nll overflows exp
    mean_nll: float  # mean next-token negative log-likelihood, in nats
    n_tokens: int  # predicted tokens: n_windows * (window - 1)


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def perplexity(
    model: torch.nn.Module,
    windows: torch.LongTensor,
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    progress: bool = False,
    description: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``model`` over ``windows`` ``(n_windows, window)``.

    Runs under ``torch.inference_mode`` in eval mode (the model's training flag is restored
    afterwards) without a KV cache; the log-softmax is taken in fp32 whatever the model's dtype.
    ``device`` is where the windows go (default: the device of the model's first parameter).
    ``progress``: a progress bar over the windows (with an ETA), labelled ``description``.
    Raises :class:`NonFiniteError` when the model produces NaN logits.
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise InvalidArgument(
            f"windows must be (n_windows >= 1, window >= 2) token ids, got {tuple(windows.shape)}"
        )
    if windows.dtype not in (torch.int64, torch.int32):
        raise InvalidArgument(f"windows must hold integer token ids, got {windows.dtype}")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size ({batch_size}) must be at least 1")
    device = torch.device(device) if device is not None else _model_device(model)
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.dtype != torch.float32:
        logger.warning(
            "model weights are %s; the protocol's reference figures are fp32", parameter.dtype
        )

    n_windows, window = windows.shape
    bar = tqdm(total=n_windows, desc=description, unit="window", disable=not progress)

    # Accumulated in float64: 40k per-token losses summed in fp32 would lose digits.
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch_start in range(0, n_windows, batch_size):
                input_ids = windows[batch_start : batch_start + batch_size].to(
                    device=device, dtype=torch.int64
                )
                logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
                # Position t predicts token t + 1; the last position predicts nothing.
                predicted = logits[:, :-1, :].float().flatten(0, 1)  # (B * (T - 1), V)
                targets = input_ids[:, 1:].flatten()  # (B * (T - 1),)
                nll = F.cross_entropy(predicted, targets, reduction="sum")
                if torch.isnan(nll):
                    raise NonFiniteError(
                        f"the model produced NaN logits on windows {batch_start}.."
                        f"{batch_start + input_ids.shape[0] - 1}"
                    )
                total_nll += nll.double()
                bar.update(input_ids.shape[0])
    finally:
        bar.close()
        model.train(was_training)

    n_tokens = n_windows * (window - 1)
    mean_nll = total_nll.item() / n_tokens
    try:
        value = math.exp(mean_nll)
    except OverflowError:  # a destroyed model: report inf rather than fail
        value = math.inf
    return PerplexityResult(perplexity=value, mean_nll=mean_nll, n_tokens=n_tokens)


def evaluate_protocol(
    model: torch.nn.Module,
    tokenizer,
    datasets: Iterable[str] = ("wikitext2", "c4"),
    *,
    n_windows: Mapping[str, int | None] | None = None,
    window: int = EVALUATION_WINDOW,
    device: torch.device | str | None = None,
    batch_size: int = 1,
    progress: bool = False,
    data_dir: str | os.PathLike | None = None,
) -> dict[str, PerplexityResult]:
    """Perplexity on each data set of the benchmark protocol, keyed by data set name.

    ``datasets`` holds ``"wikitext2"``, ``"c4"``, their ``"hub:"`` names or local file paths
    (see :func:`obs_compress.data.protocol_texts`); ``data_dir`` is the data folder of
    ``"wikitext2"``/``"c4"`` (default ``$OBS_COMPRESS_DATA_DIR``). ``n_windows`` overrides the
    protocol's window counts (40 for WikiText-2, 20 for C4) per name; a name without a count
    scores every window.
    """
    counts: dict[str, int | None] = dict(EVALUATION_N_WINDOWS)
    if n_windows is not None:
        counts.update(n_windows)
    results: dict[str, PerplexityResult] = {}
    for name in datasets:
        windows = evaluation_windows(
            tokenizer,
            protocol_texts(name, data_dir=data_dir),
            window=window,
            n_windows=counts.get(name),
        )
        logger.info("%s: scoring %d windows of %d tokens", name, windows.shape[0], window)
        result = perplexity(
            model,
            windows,
            batch_size=batch_size,
            device=device,
            progress=progress,
            description=f"perplexity {name}",
        )
        logger.info(
            "%s: perplexity %.4f (mean nll %.6f over %d tokens; %d windows of %d, tokens %s)",
            name,
            result.perplexity,
            result.mean_nll,
            result.n_tokens,
            windows.shape[0],
            window,
            token_digest(windows),
        )
        results[name] = result
    return results
