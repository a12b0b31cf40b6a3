#!/usr/bin/env bash
# The main job of the README: set up, convert SmolLM2-135M-Instruct once, prune it with
# recipes/obs-50.yaml calibrating on the shared C4 file (../shared/data, the benchmark
# protocol), print the per-layer report, and WikiText-2 perplexity before and after.
#
#   bash tools/main_job.sh                                  # the whole job
#   RECIPE=recipes/obs-2of4.yaml bash tools/main_job.sh     # another recipe
#   bash tools/main_job.sh --set calibration.n_samples=16   # extra arguments go to `prune`
#   DATA_DIR=/data bash tools/main_job.sh                   # another folder of c4/, wikitext2/
#
# The pruned checkpoint goes to $OUT (default out/smollm2-<recipe>), replaced on a rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${RECIPE:-recipes/obs-50.yaml}
OUT=${OUT:-out/smollm2-$(basename "$RECIPE" .yaml)}
DEVICE=${DEVICE:-auto}
# The folder of the named data sets c4 and wikitext2 (--data-dir): the shared one beside the
# checkout, unless the caller names another.
DATA_DIR=${DATA_DIR:-${OBS_COMPRESS_DATA_DIR:-$(cd .. && pwd)/shared/data}}

bash tools/setup_env.sh
. .venv/bin/activate
RESULTS=$(mktemp -d)
trap 'rm -rf "$RESULTS"' EXIT

echo "== converting SmolLM2-135M-Instruct (once)"
MODEL=$(python tools/convert_gguf.py | tail -n 1)
echo "model: $MODEL"

echo "== dense WikiText-2 perplexity"
obs-compress eval --model "$MODEL" --dataset wikitext2 --data-dir "$DATA_DIR" --device "$DEVICE" | tee "$RESULTS/dense.txt"

echo "== pruning with $RECIPE (calibration: shared C4 file)"
start=$(date +%s)
obs-compress prune --model "$MODEL" --recipe "$RECIPE" --out "$OUT" --device "$DEVICE" \
  --data-dir "$DATA_DIR" --overwrite "$@"
end=$(date +%s)

echo "== pruned WikiText-2 perplexity"
obs-compress eval --model "$OUT" --dataset wikitext2 --data-dir "$DATA_DIR" --device "$DEVICE" | tee "$RESULTS/pruned.txt"

echo "== summary"
echo "recipe:             $RECIPE"
echo "output:             $OUT"
echo "prune wall time:    $((end - start)) s"
echo "dense  wikitext2:   $(cut -d' ' -f3 "$RESULTS/dense.txt")"
echo "pruned wikitext2:   $(cut -d' ' -f3 "$RESULTS/pruned.txt")"
