"""``obs-compress``: prune, evaluate and inspect Hugging Face checkpoints.

The only module that reads ``argv`` or configures logging. Errors of obs_compress print one
line (``error: ...``) and exit with status 2; Ctrl-C or SIGTERM exits with 130 and leaves no
output folder (a streaming run leaves its resumable ``.<out>.in-progress`` beside it).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import textwrap
from pathlib import Path
from typing import Sequence

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

_DESCRIPTION = "One-shot pruning of Hugging Face models with Optimal Brain Surgeon."
_EPILOG = textwrap.dedent("""\
    examples:
      obs-compress prune --model ./SmolLM2 --recipe recipes/obs-50.yaml --out out/smollm2-obs50
      obs-compress prune --model ./SmolLM2 --recipe recipes/obs-2of4.yaml --out out/s24 \\
          --set calibration.n_samples=32 --dataset wikitext2
      obs-compress eval --model out/smollm2-obs50 --dataset wikitext2
      obs-compress inspect out/smollm2-obs50
      obs-compress recipe recipes/obs-2of4.yaml
    """)

_PRUNE_EPILOG = textwrap.dedent("""\
    Recipe fields (see recipes/*.yaml): method, sparsity, pattern, allocation, block_size,
    dampening_frac, max_dampening_frac, refit, inverse, targets, ignore, overrides,
    sequential, block_sparsity, calibration, curvature (hessian | kronecker), structured
    (whole MLP channels and heads out: a smaller dense model; recipes/structured-*.yaml)
    (obs-compress recipe FILE checks a recipe).
    --set takes YAML values: --set sparsity=0.7 --set pattern=2:4 --set refit=true
    --set calibration.n_samples=32 --set "targets=['mlp']" --set structured.mlp_fraction=0.1.

    Calibration (--dataset): c4 or wikitext2 (files of --data-dir, default
    $OBS_COMPRESS_DATA_DIR; never downloaded), hub:c4 or hub:wikitext2 (the same data from the
    Hugging Face hub), a local .txt/.json/.jsonl/.parquet file (its 'text' field), 'self'
    (text the model generates, for when no data set is reachable), or 'none' (magnitude
    only: no forward, no loss).

    The output is written to a hidden temporary folder beside --out and renamed at the end:
    an interrupted run leaves no --out. The source folder is never modified. A local folder
    of safetensors is streamed (one block in memory at a time) into .<out>.in-progress,
    which records its progress after every block: --resume continues a killed run there.
    """)


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if verbosity <= 0:
        # transformers' own progress and advisory messages would drown ours.
        for name in ("transformers", "datasets", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars: ours is enough


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", metavar="DIR",
                        help="folder holding c4/c4_validation_2k.parquet and "
                             "wikitext2/wiki.test.raw (default: $OBS_COMPRESS_DATA_DIR)")


def _parser() -> argparse.ArgumentParser:
    from .export.formats import FORMATS
    from .memory_plan import ACTIVATIONS

    parser = argparse.ArgumentParser(
        prog="obs-compress", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    prune = commands.add_parser(
        "prune", help="prune a checkpoint by a recipe and write a sparse checkpoint",
        description=textwrap.fill(
            "Prune every target Linear layer of a checkpoint by a recipe, calibrating on real "
            "text, and write a Hugging Face folder that transformers loads.", 88),
        epilog=_PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("--model", required=True, metavar="PATH_OR_ID",
                       help="a local Hugging Face folder or a hub id")
    prune.add_argument("--recipe", required=True, metavar="RECIPE.yaml",
                       help="the recipe (e.g. recipes/obs-50.yaml)")
    prune.add_argument("--out", required=True, metavar="DIR", help="output folder")
    prune.add_argument("--dataset", metavar="SOURCE",
                       help="calibration source: c4, wikitext2, hub:c4, hub:wikitext2, self, "
                            "none or a file (default: the recipe's calibration.source)")
    _add_data_dir(prune)
    prune.add_argument("--device", default="auto",
                       help="where each block runs: auto (GPU if any), cpu, cuda, cuda:1 "
                            "(default: auto); only one block at a time is moved there")
    prune.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                       default="auto", help="load the weights in this dtype (default: as stored)")
    prune.add_argument("--batch-size", type=int, default=8, metavar="N",
                       help="calibration samples per forward (default: 8)")
    prune.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       dest="assignments", help="override a recipe field (repeatable)")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace a non-empty existing --out")
    prune.add_argument("--allow-pickle", action="store_true",
                       help="allow loading pickle (.bin) weights; they can run code")
    prune.add_argument("--trust-remote-code", action="store_true",
                       help="allow running modeling code shipped with the checkpoint")
    prune.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                       help="largest safetensors shard (default: 2GB)")
    prune.add_argument("--format", choices=FORMATS, default="dense",
                       help="how the pruned weights are stored: dense (zeros in place), "
                            "bitmask (packed mask + kept values) or nm (the recipe's N:M "
                            "pattern: kept values + positions); docs/FORMAT.md "
                            "(default: dense)")
    prune.add_argument("--eval", action="append", default=[], metavar="DATASET",
                       dest="evaluate",
                       help="measure perplexity on DATASET (wikitext2, c4, hub:wikitext2, "
                            "hub:c4 or a text file; repeatable) before and after pruning, "
                            "into the report")
    prune.add_argument("--eval-windows", type=int, metavar="N",
                       help="with --eval: score the first N windows of 1024 tokens (default: "
                            "the protocol's 40 of WikiText-2, 20 of C4, every window of a file)")
    prune.add_argument("--resume", action="store_true",
                       help="continue the interrupted run of --out from its last finished "
                            "block (same model, recipe, calibration and settings)")
    prune.add_argument("--in-memory", action="store_true",
                       help="load the whole model instead of streaming a safetensors folder "
                            "one block at a time (the default)")
    prune.add_argument("--dry-run", action="store_true",
                       help="print the memory plan (peak CPU and GPU memory, disk) from the "
                            "model's config and the recipe, and stop: no weight is read")
    prune.add_argument("--activations", choices=ACTIVATIONS, default="auto",
                       help="where the calibration activations are held between blocks: on the "
                            "compute device, in CPU memory, or on disk (a memory-mapped file); "
                            "auto: the device when they fit (the report and --dry-run say)")
    prune.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                       help="under torchrun: how long a process waits for the others before "
                            "it fails (default 1800)")
    prune.add_argument("--no-progress", action="store_true", help="no progress bar")
    prune.add_argument("--report", metavar="FILE",
                       help="also write the report JSON here (it is always in --out)")

    evaluate = commands.add_parser(
        "eval", help="perplexity of a checkpoint (WikiText-2, C4 or a file)",
        description=textwrap.fill(
            "Perplexity by the project's protocol: non-overlapping windows of 1024 tokens, the "
            "first 40 of WikiText-2 and 20 of C4 unless --windows says.", 88))
    evaluate.add_argument("--model", required=True, metavar="PATH_OR_ID")
    evaluate.add_argument("--dataset", action="append", metavar="NAME_OR_FILE",
                          help="wikitext2, c4, hub:wikitext2, hub:c4 or a text file; "
                               "repeatable (default: wikitext2)")
    _add_data_dir(evaluate)
    evaluate.add_argument("--windows", type=int, metavar="N",
                          help="score the first N windows (default: the protocol's count, "
                               "every window for a file)")
    evaluate.add_argument("--window", type=int, default=1024, help="tokens per window")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    evaluate.add_argument("--allow-pickle", action="store_true",
                          help="allow loading pickle (.bin) weights")
    evaluate.add_argument("--trust-remote-code", action="store_true",
                          help="allow running modeling code shipped with the checkpoint")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")

    inspect = commands.add_parser(
        "inspect", help="per-layer sparsity and N:M check of a checkpoint",
        description=textwrap.fill(
            "Measure every 2-D weight of a safetensors checkpoint (nothing is instantiated or "
            "unpickled) and check the N:M pattern its config.json records, if any.", 88))
    inspect.add_argument("folder", metavar="DIR")
    inspect.add_argument("--pattern", metavar="N:M",
                         help="check this N:M pattern (default: the one config.json's "
                              "sparsity section records; none for an unstructured checkpoint)")
    inspect.add_argument("--json", action="store_true", help="print the result as JSON")

    convert = commands.add_parser(
        "convert", help="rewrite a checkpoint folder in another weight format",
        description=textwrap.fill(
            "Rewrite a folder (ours in any format, or a dense Hugging Face folder of "
            "safetensors) in another format, tensor by tensor, into a new folder; the source "
            "is never modified (docs/FORMAT.md).", 88))
    convert.add_argument("source", metavar="IN")
    convert.add_argument("out", metavar="OUT")
    convert.add_argument("--format", required=True, choices=FORMATS)
    convert.add_argument("--pattern", metavar="N:M",
                         help="for --format nm: the N:M pattern (default: the one config.json's "
                              "sparsity section records)")
    convert.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                         help="largest safetensors shard (default: 2GB)")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace a non-empty existing OUT")

    recipe = commands.add_parser(
        "recipe", help="check a recipe and print it resolved, or print the recipe schema",
        description=textwrap.fill(
            "Check a recipe file and print it with every field resolved (defaults filled in, "
            "N:M sparsities implied), or print the JSON Schema of recipe files "
            "(recipes/recipe.schema.json) with --schema.", 88))
    recipe.add_argument("file", nargs="?", metavar="RECIPE.yaml", help="the recipe to check")
    recipe.add_argument("--schema", action="store_true",
                        help="print the JSON Schema of recipe files instead")
    return parser


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _run_prune(args: argparse.Namespace) -> int:
    from .api import prune_checkpoint
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.assignments:
        recipe = recipe.with_updates(args.assignments)
    if args.batch_size < 1:
        raise _usage_error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.eval_windows is not None and args.eval_windows < 1:
        raise _usage_error(f"--eval-windows must be >= 1, got {args.eval_windows}")
    if args.dry_run:
        return _print_memory_plan(args, recipe)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        run = prune_checkpoint(args.model, recipe, args.out, dataset=args.dataset,
                               device=args.device, overwrite=args.overwrite,
                               allow_pickle=args.allow_pickle,
                               trust_remote_code=args.trust_remote_code,
                               dtype=None if args.dtype == "auto" else args.dtype,
                               batch_size=args.batch_size, progress=not args.no_progress,
                               max_shard_size=args.max_shard_size, data_dir=args.data_dir,
                               evaluate=args.evaluate, eval_windows=args.eval_windows,
                               streaming=False if args.in_memory else None,
                               resume=args.resume, format=args.format,
                               dist_timeout_s=args.dist_timeout,
                               activations=args.activations)
    if run.rank != 0:  # rank 0 prints and writes the report for all
        return 0
    print(run.report.table())
    print(f"wrote {run.out_dir} in {run.seconds:.1f} s")
    if args.report:
        Path(args.report).write_text(json.dumps(run.report.to_dict(), indent=2) + "\n",
                                     encoding="utf-8")
    return 0


def _print_memory_plan(args: argparse.Namespace, recipe) -> int:
    from .api import resolve_device
    from .distributed import world_size_from_environment
    from .memory_plan import GIB, free_disk_bytes, plan_memory

    device = resolve_device(args.device)
    plan = plan_memory(args.model, recipe, device="cpu" if device is None else device.type,
                       dtype=None if args.dtype == "auto" else args.dtype,
                       batch_size=args.batch_size, streaming=not args.in_memory,
                       trust_remote_code=args.trust_remote_code,
                       activations=args.activations, world_size=world_size_from_environment())
    print(plan.table())
    free = free_disk_bytes(args.out)
    if free is not None:
        print(f"  free disk at {args.out}: {free / GIB:.2f} GiB"
              + ("" if free >= plan.disk_bytes else "  (NOT ENOUGH for the output)"))
    if args.report:
        Path(args.report).write_text(json.dumps(plan.to_dict(), indent=2) + "\n",
                                     encoding="utf-8")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .api import evaluate_perplexity
    from .model.loading import load_model

    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        loaded = load_model(args.model, allow_pickle=args.allow_pickle,
                            trust_remote_code=args.trust_remote_code)
        if loaded.tokenizer is None:
            raise _usage_error(f"{args.model} has no tokenizer files; cannot evaluate on text")
        results = evaluate_perplexity(loaded.model, loaded.tokenizer,
                                      args.dataset or ["wikitext2"], device=args.device,
                                      n_windows=args.windows, window=args.window,
                                      progress=not args.no_progress, data_dir=args.data_dir)
    if args.json:
        print(json.dumps({name: vars(result) for name, result in results.items()}, indent=2))
    else:
        for name, result in results.items():
            print(f"{name}: perplexity {result.perplexity:.4f} "
                  f"(mean nll {result.mean_nll:.6f} over {result.n_tokens} tokens)")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from .export.inspection import inspect_checkpoint

    result = inspect_checkpoint(args.folder, pattern=args.pattern)
    if args.json:
        print(json.dumps({
            "folder": str(result.folder),
            "pattern": str(result.pattern) if result.pattern is not None else None,
            "recorded_patterns": dict(result.recorded),
            "global_sparsity": result.global_sparsity, "sparsity_section": result.section,
            "format": result.format, "stored_bytes": result.stored_bytes,
            "dense_bytes": result.dense_bytes,
            "tensors": [{"name": t.name, "shape": list(t.shape), "sparsity": t.sparsity,
                         "nm": t.nm_axis is not None if result.pattern is not None else None,
                         "nm_axis": t.nm_axis,
                         "target": t.target, "format": t.format,
                         "stored_bytes": t.stored_bytes, "dense_bytes": t.dense_bytes}
                        for t in result.tensors]}, indent=2))
    else:
        print(result.table())
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from .export.convert import convert_checkpoint

    out = convert_checkpoint(args.source, args.out, args.format, pattern=args.pattern,
                             overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"wrote {out} (format {args.format})")
    return 0


def _run_recipe(args: argparse.Namespace) -> int:
    from .recipe import load_recipe, recipe_json_schema

    if args.schema == (args.file is not None):
        raise _usage_error("give a recipe file to check, or --schema (not both)")
    if args.schema:
        print(json.dumps(recipe_json_schema(), indent=2, sort_keys=True))
    else:
        print(load_recipe(args.file).to_yaml(), end="")
    return 0


class _UsageError(Exception):
    pass


def _usage_error(message: str) -> _UsageError:
    return _UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging(-1 if args.quiet else args.verbose)
    from .errors import ObsCompressError

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        command = {"prune": _run_prune, "eval": _run_eval, "inspect": _run_inspect,
                   "convert": _run_convert, "recipe": _run_recipe}[args.command]
        return command(args)
    except (ObsCompressError, _UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: no --out was written (a streaming run keeps its finished blocks "
              "in .<out>.in-progress beside it: run again with --resume to continue)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
