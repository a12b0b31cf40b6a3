#!/usr/bin/env bash
# One prepared check of obs_compress on a GPU machine, in at most 8 minutes:
#
#   bash tools/gpu_check.sh OUT_DIR [--dry-run]
#
# Steps, each under `timeout`, each logged, each run even when an earlier one failed:
#   1. setup        install the carried wheels (.whl/*.whl) into a temporary folder and make
#                   the repository importable without pip install (PYTHONPATH, and a
#                   temporary obs_compress_kernels -> kernels link, removed on exit, when the
#                   import would not find this checkout's kernels)
#   2. environment  nvidia-smi, Python and package versions, commit, date  -> env.txt
#   3. gpu tests    python3 -m pytest -m gpu, Triton compiled (TRITON_INTERPRET=0)  -> tests.log
#   4. kernel tests the kernel test files' Triton cases compiled on CUDA tensors against
#                   their torch references (tests/_triton_device.py)  -> tests.log
#   5. model        tools/make_random_llama.py --preset 1b: a random 1.1B-parameter Llama,
#                   its word tokenizer and calibration.jsonl, in a temporary folder  -> prune.log
#   6. prune        obs-compress prune (recipes/obs-50.yaml, 32 x 512 calibration tokens,
#                   --device cuda) in-process through tools/measure_prune.py: wall time, peak
#                   GPU memory, the per-layer report  -> prune.log, prune_report.json
#   7. inspect      obs-compress inspect of the pruned checkpoint  -> prune.log
#   8. inference    tools/bench_inference.py: a Llama-3-8B-shaped model with random weights
#                   built on the GPU in bf16, pruned (magnitude) at 50%, 2:4 and 70%, dense
#                   against sparse_inference interleaved: decode and 512-token prefill
#                   tokens/s, per-layer matmul times, peak memory  -> bench.md, bench.log
#   9. bench        tools/bench_kernels.py at the Llama-3-8B layer shapes (q/o 4096x4096,
#                   k/v 1024x4096, gate/up 14336x4096, down 4096x14336), torch vs Triton,
#                   with whatever time is left  -> bench.md (after the inference tables),
#                   bench.json, bench.log
# summary.md (rewritten after every step) has each step's status and the figures.
# OUT_DIR ends up with exactly these 8 files, the most the device tool brings back.
#
# --dry-run: the same steps on this CPU in well under a minute: the wheels are installed
# for Python 3.12 into a scratch folder (a check that the set is complete, not importable
# here), a tiny model (--preset tiny) is pruned with --device cpu, bench_kernels runs on an
# 8x32 layer, bench_inference on the tiny random Llama, and the GPU-only steps say
# "skipped (no GPU)".
#
# Time: GPU_CHECK_BUDGET_S (default 450 s; 120 s for --dry-run) bounds the whole run; each
# step has its own cap and gets no more than what is left; the bench takes the rest.
# PYTHON (default python3) is the interpreter; GPU_CHECK_COMMIT names the commit in env.txt
# when the copy has no .git.
#
# Before the device call, on a machine with PyPI (pydantic is not on the GPU machine):
#   bash tools/gpu_wheels.sh        # .whl/: pydantic and what it needs, ~2.7 MiB
# The device call (one call; .whl is ignored by git, so it must be carried):
#   run(command="GPU_CHECK_COMMIT=<commit> bash tools/gpu_check.sh $OUT/gpu",
#       carry=[".whl"], timeout_s=560)
# docs/GPU.md says more.

set -uo pipefail  # no -e: a failed step is recorded and the next one runs

usage() { echo "usage: bash tools/gpu_check.sh OUT_DIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT_ARG=$1
DRY_RUN=0
if [[ $# -eq 2 ]]; then [[ $2 == --dry-run ]] || usage; DRY_RUN=1; fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
mkdir -p "$OUT_ARG" || exit 2
OUT_DIR="$(cd "$OUT_ARG" && pwd)"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-$([[ $DRY_RUN == 1 ]] && echo 120 || echo 450)}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # model, pruned model, wheels
STARTED_AT="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
START=$SECONDS

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Nothing outside the GPU machine answers: fail fast instead of waiting on the hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false

KERNELS_LINK=""
cleanup() {
    [[ -n $KERNELS_LINK && -L $KERNELS_LINK ]] && rm -f "$KERNELS_LINK"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ENV_TXT="$OUT_DIR/env.txt"
: >"$ENV_TXT"
for name in tests.log prune.log bench.log; do : >"$OUT_DIR/$name"; done
rm -f "$OUT_DIR"/{summary.md,prune_report.json,bench.md,bench.json}

# ---- Summary ---------------------------------------------------------------------------------

STEP_ROWS=()
FIGURES=""
DEVICE_NAME="(not read yet)"
COMMIT="(not read yet)"

write_summary() {
    {
        echo "# GPU check: ${DEVICE_NAME}"
        echo
        echo "Started $STARTED_AT, commit $COMMIT, mode $([[ $DRY_RUN == 1 ]] && echo 'dry run (CPU)' || echo full);"
        echo "$((SECONDS - START)) s of the ${BUDGET_S} s budget used when this was written."
        echo
        echo "| step | status | seconds | log |"
        echo "| --- | --- | ---: | --- |"
        printf '%s\n' "${STEP_ROWS[@]}"
        printf '%s' "$FIGURES"
    } >"$OUT_DIR/summary.md"
}

# Seconds a step may take: its CAP, or what is left of the budget less a 5 s margin.
allowed_seconds() {
    local cap=$1 left=$((BUDGET_S - (SECONDS - START) - 5))
    echo $((cap < left ? cap : left))
}

record() {  # record NAME STATUS SECONDS LOG
    STEP_ROWS+=("| $1 | $2 | $3 | $4 |")
    echo "[gpu_check $((SECONDS - START)) s] $1: $2 (${3} s)"
    write_summary
}

LAST_STATUS=""
# run_step NAME CAP LOG COMMAND...: COMMAND under timeout, output appended to OUT_DIR/LOG.
# Sets LAST_STATUS to ok | FAILED (exit N) | TIMED OUT after N s | skipped (out of time).
run_step() {
    local name=$1 cap=$2 log=$3 rc began seconds
    shift 3
    local allowed
    allowed=$(allowed_seconds "$cap")
    if ((allowed < 10)); then
        LAST_STATUS="skipped (out of time)"
        LAST_SECONDS=0
        echo "==== $name: $LAST_STATUS" >>"$OUT_DIR/$log"
        return 1
    fi
    echo "==== $name: $* (at most ${allowed} s)" >>"$OUT_DIR/$log"
    began=$SECONDS
    timeout --kill-after=15 "$allowed" "$@" >>"$OUT_DIR/$log" 2>&1
    rc=$?
    seconds=$((SECONDS - began))
    if ((rc == 0)); then
        LAST_STATUS="ok"
    elif ((rc == 124 || rc == 137)); then
        LAST_STATUS="TIMED OUT after ${allowed} s"
    else
        LAST_STATUS="FAILED (exit $rc)"
    fi
    echo "==== $name: $LAST_STATUS in ${seconds} s" >>"$OUT_DIR/$log"
    LAST_SECONDS=$seconds
    return "$rc"
}
LAST_SECONDS=0

skip() {  # skip NAME LOG REASON
    echo "==== $1: $3" >>"$OUT_DIR/$2"
    record "$1" "$3" 0 "$2"
}

pytest_tally() {  # the last "N passed, M skipped in Xs" line of a log section
    grep -E '^=*.*[0-9]+ (passed|failed|error|skipped|deselected)' "$1" | tail -n 1 \
        | sed -E 's/^=+ //; s/ =+$//'
}

# ---- 1. Setup: wheels and imports --------------------------------------------------------------

setup_step() {
    local began=$SECONDS status="ok" wheels=(.whl/*.whl)
    {
        echo "## setup"
        if [[ ! -e ${wheels[0]} ]]; then
            echo "no .whl/*.whl here: nothing to install (tools/gpu_wheels.sh makes them)"
        elif [[ $DRY_RUN == 1 ]]; then
            # This Python is not the GPU machine's 3.12: install for 3.12 into a scratch folder
            # only to check that the set is complete and one version of each.
            echo "wheels, installed for Python 3.12 / manylinux x86-64 into a scratch folder:"
            timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --upgrade --target "$WORK/site" --only-binary=:all: \
                --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 "${wheels[@]}" || status="FAILED (wheels)"
            ls "$WORK/site"
        else
            echo "installing ${wheels[*]} into $WORK/site"
            if timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --upgrade --target "$WORK/site" "${wheels[@]}"; then
                export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
            else
                status="FAILED (wheels)"
            fi
        fi
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        echo "PYTHONPATH=$PYTHONPATH"
        # pyproject.toml installs kernels/ as the package obs_compress_kernels; without pip
        # install a link stands in, unless the import already finds this checkout's kernels.
        local found
        found=$("$PYTHON" -c 'import os, obs_compress_kernels as k; print(os.path.realpath(os.path.dirname(k.__file__)))' 2>/dev/null)
        if [[ $found != "$(realpath "$REPO/kernels")" ]]; then
            if [[ -e $REPO/obs_compress_kernels || -L $REPO/obs_compress_kernels ]]; then
                echo "obs_compress_kernels resolves to '${found:-nothing}' and $REPO/obs_compress_kernels exists: left alone"
                status="FAILED (kernels import)"
            else
                ln -s kernels "$REPO/obs_compress_kernels" && KERNELS_LINK="$REPO/obs_compress_kernels"
                echo "linked obs_compress_kernels -> kernels (removed on exit)"
            fi
        fi
        "$PYTHON" -c 'import obs_compress, obs_compress_kernels, obs_compress.cli
print("obs_compress from", obs_compress.__file__)
print("obs_compress_kernels from", obs_compress_kernels.__file__)' || status="FAILED (imports)"
        "$PYTHON" -c 'import pydantic, pydantic_core
print("pydantic", pydantic.VERSION, "from", pydantic.__file__)' || echo "pydantic: not importable"
        echo
    } >>"$ENV_TXT" 2>&1
    record "setup: wheels, imports" "$status" $((SECONDS - began)) env.txt
}

# ---- 2. Environment ----------------------------------------------------------------------------

environment_step() {
    local began=$SECONDS
    COMMIT="$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo "${GPU_CHECK_COMMIT:-unknown (no .git; set GPU_CHECK_COMMIT)}")"
    if [[ -d $REPO/.git || -f $REPO/.git ]] && [[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
        COMMIT="$COMMIT (with uncommitted changes)"
    fi
    {
        echo "## environment"
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit: $COMMIT"
        echo "host: $(uname -srm), $(nproc) CPUs, $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB"}')"
        echo
        if command -v nvidia-smi >/dev/null; then
            timeout 20 nvidia-smi
            timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
        else
            echo "nvidia-smi: not here"
        fi
        echo
        timeout 60 "$PYTHON" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], "at", sys.executable)
for name in ("torch", "triton", "transformers", "tokenizers", "safetensors", "accelerate",
             "numpy", "yaml", "tqdm", "pytest", "pydantic", "datasets", "gguf"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:
        print(f"{name}: not importable ({type(error).__name__})")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch built for CUDA", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
          f"{p.multi_processor_count} SMs")
print("torch threads:", torch.get_num_threads())
EOF
    } >>"$ENV_TXT" 2>&1
    HAVE_GPU=0
    DEVICE_NAME="CPU ($(uname -m), $(nproc) CPUs)"
    if [[ $DRY_RUN == 0 ]] && "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        HAVE_GPU=1
        DEVICE_NAME="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)"
    fi
    record "environment" "ok" $((SECONDS - began)) env.txt
}

# ---- 3-4. Tests with the kernels compiled -------------------------------------------------------

gpu_tests_step() {
    local name="gpu tests: pytest -m gpu, Triton compiled"
    if [[ $HAVE_GPU == 0 ]]; then skip "$name" tests.log "skipped (no GPU)"; return; fi
    local mark=$(( $(wc -l <"$OUT_DIR/tests.log") + 1 ))
    run_step "$name" 150 tests.log env TRITON_INTERPRET=0 "$PYTHON" -m pytest -m gpu -q -rfEs \
        -p no:cacheprovider --durations=5 tests
    record "$name" "$LAST_STATUS: $(tail -n +"$mark" "$OUT_DIR/tests.log" | pytest_tally /dev/stdin)" \
        "$LAST_SECONDS" tests.log
}

kernel_tests_step() {
    local name="kernel tests: Triton cases compiled on CUDA vs torch references"
    if [[ $HAVE_GPU == 0 ]]; then skip "$name" tests.log "skipped (no GPU)"; return; fi
    local mark=$(( $(wc -l <"$OUT_DIR/tests.log") + 1 ))
    # -m gpu ran the layer-size cases already; these are the small and odd shapes.
    run_step "$name" 150 tests.log env TRITON_INTERPRET=0 "$PYTHON" -m pytest \
        -m "not gpu and not slow" -q -rfEs -p no:cacheprovider --durations=5 \
        tests/test_kernels_greedy_obs.py tests/test_kernels_masks.py \
        tests/test_kernels_sparse_matmul.py
    record "$name" "$LAST_STATUS: $(tail -n +"$mark" "$OUT_DIR/tests.log" | pytest_tally /dev/stdin)" \
        "$LAST_SECONDS" tests.log
}

# ---- 5-7. A random Llama pruned end to end -------------------------------------------------------

MODEL="$WORK/model"
PRUNED="$WORK/pruned"

model_step() {
    local preset=tiny
    [[ $HAVE_GPU == 1 ]] && preset=1b
    local name="model: tools/make_random_llama.py --preset $preset"
    run_step "$name" 120 prune.log "$PYTHON" tools/make_random_llama.py "$MODEL" \
        --preset "$preset" --seed 0
    local made
    made=$(grep -o '[0-9,]* parameters ([0-9,]* in the block Linears), [a-z0-9]*' "$OUT_DIR/prune.log" | tail -n 1)
    record "$name" "$LAST_STATUS${made:+: $made}" "$LAST_SECONDS" prune.log
}

prune_step() {
    local device=cpu
    [[ $HAVE_GPU == 1 ]] && device=cuda
    local name="prune: recipes/obs-50.yaml, 32 x 512 tokens, --device $device"
    if [[ ! -f $MODEL/config.json ]]; then skip "$name" prune.log "skipped (no model)"; return; fi
    run_step "$name" 270 prune.log "$PYTHON" tools/measure_prune.py -- prune --model "$MODEL" \
        --recipe recipes/obs-50.yaml --out "$PRUNED" --dataset "$MODEL/calibration.jsonl" \
        --set calibration.n_samples=32 --set calibration.seq_len=512 --device "$device" \
        --report "$OUT_DIR/prune_report.json" --no-progress
    record "$name" "$LAST_STATUS" "$LAST_SECONDS" prune.log
    [[ $LAST_STATUS == skipped* ]] && return
    local measured
    measured=$(grep '^MEASURED ' "$OUT_DIR/prune.log" | tail -n 1)
    FIGURES+=$'\n'"## Prune of the random Llama ($device)"$'\n\n'
    FIGURES+="In-process measurement (tools/measure_prune.py): \`${measured:-none (the run printed no MEASURED line)}\`"$'\n\n'
    if [[ -f $OUT_DIR/prune_report.json ]]; then
        FIGURES+="$("$PYTHON" - "$OUT_DIR/prune_report.json" <<'EOF' 2>&1
import collections, json, sys
report = json.load(open(sys.argv[1]))
print(f"Report: global sparsity {report['global_sparsity']:.4f} over {report['n_layers']} layers "
      f"in {report['n_blocks']} blocks, {report['n_samples']} x {report['seq_len']} tokens, "
      f"driver {report['seconds']:.1f} s (load and save excluded).")
print()
by_kind = collections.defaultdict(float)
for layer in report["layers"]:
    by_kind[layer["name"].rsplit(".", 1)[-1]] += layer["seconds"] or 0.0
print("Solve seconds by layer kind, summed over blocks: "
      + ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in by_kind.items()) + ".")
EOF
)"$'\n'
    fi
    write_summary
}

inspect_step() {
    local name="inspect: the pruned checkpoint"
    if [[ ! -f $PRUNED/config.json ]]; then skip "$name" prune.log "skipped (no pruned model)"; return; fi
    run_step "$name" 90 prune.log "$PYTHON" -m obs_compress.cli inspect "$PRUNED"
    local line
    line=$(grep -E 'target tensors: global sparsity' "$OUT_DIR/prune.log" | tail -n 1)
    record "$name" "$LAST_STATUS${line:+: $line}" "$LAST_SECONDS" prune.log
}

# ---- 8. Sparse inference bench ---------------------------------------------------------------------

INFERENCE_MD="$WORK/inference.md"

inference_step() {
    local args name
    if [[ $HAVE_GPU == 1 ]]; then
        name="inference: bench_inference.py, random Llama-3-8B shapes, bf16, 50% / 2:4 / 70%"
        args=(--device cuda --dtype bfloat16 --random-llama 8b --decode-steps 16 --rounds 5
              --prefill-rounds 3 --layer-rounds 3)
    else
        name="inference: bench_inference.py, tiny random Llama on CPU"
        args=(--device cpu --random-llama tiny --decode-steps 2 --rounds 1 --prefill-rounds 1
              --layer-rounds 1 --prefill-tokens 32)
    fi
    run_step "$name" 240 bench.log "$PYTHON" tools/bench_inference.py "${args[@]}" \
        --markdown "$INFERENCE_MD"
    record "$name" "$LAST_STATUS" "$LAST_SECONDS" bench.log
    if [[ -f $INFERENCE_MD ]]; then
        FIGURES+=$'\n## Sparse inference bench (bench.md)\n\n'"$(cat "$INFERENCE_MD")"$'\n'
    else
        FIGURES+=$'\n## Sparse inference bench\n\nNo table: see bench.log.\n'
    fi
    write_summary
}

# ---- 9. Kernel bench ------------------------------------------------------------------------------

bench_step() {
    local args name
    if [[ $HAVE_GPU == 1 ]]; then
        name="bench: bench_kernels.py at Llama-3-8B shapes, torch vs Triton"
        # Every shape at 50% first, then at 2:4 while time is left. The torch rows are one
        # call each (seconds of kernel launches at these shapes, nothing to compile); Triton's
        # are the median of 3 after a warm-up that compiles. obs_exact is left out: its
        # scratch kernel reads ~s^2 d / 2 history words per row (34 GB a row at d_in 4096),
        # minutes a call, more than this check can give.
        args=(--device cuda --shapes llama --repeats 3 --warmup 1 --torch-repeats 1
              --exact-rows 0)
    else
        name="bench: bench_kernels.py on an 8x32 layer, torch on CPU"
        args=(--device cpu --shape 8x32 --kernel-step --exact-rows 4)
    fi
    local allowed
    allowed=$(allowed_seconds 300)
    # Start no new layer once less than ~70 s is left: a Llama-3-8B layer takes about that.
    local start_budget=$((allowed > 140 ? allowed - 70 : allowed / 2))
    run_step "$name" 300 bench.log "$PYTHON" tools/bench_kernels.py "${args[@]}" \
        --budget-s "$start_budget" --json "$OUT_DIR/bench.json" --markdown "$OUT_DIR/bench.md"
    record "$name" "$LAST_STATUS" "$LAST_SECONDS" bench.log
    if [[ -f $OUT_DIR/bench.md ]]; then
        FIGURES+=$'\n## Kernel bench (bench.md)\n\n'"$(cat "$OUT_DIR/bench.md")"$'\n'
        # bench.md carries both benches: the device tool brings back eight files at most.
        if [[ -f $INFERENCE_MD ]]; then
            { echo "# Sparse inference (tools/bench_inference.py)"; echo; cat "$INFERENCE_MD"; echo
              echo "# Kernels (tools/bench_kernels.py)"; echo; cat "$OUT_DIR/bench.md"; } >"$WORK/bench_all.md" \
                && mv "$WORK/bench_all.md" "$OUT_DIR/bench.md"
        fi
    else
        FIGURES+=$'\n## Kernel bench\n\nNo table: see bench.log.\n'
        [[ -f $INFERENCE_MD ]] && cp "$INFERENCE_MD" "$OUT_DIR/bench.md"
    fi
    write_summary
}

# ---- Run --------------------------------------------------------------------------------------

if bash -n "${BASH_SOURCE[0]}" 2>>"$ENV_TXT"; then SYNTAX="ok"; else SYNTAX="FAILED"; fi
record "bash -n tools/gpu_check.sh" "$SYNTAX" 0 env.txt
setup_step
environment_step
gpu_tests_step
kernel_tests_step
model_step
prune_step
inspect_step
inference_step
bench_step
FIGURES+=$'\n'"Total: $((SECONDS - START)) s."$'\n'
write_summary
# Also on stdout: the device tool returns the output's tail even when files do not come back.
cat "$OUT_DIR/summary.md"
echo "[gpu_check] done in $((SECONDS - START)) s: $OUT_DIR/summary.md"
