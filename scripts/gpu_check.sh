#!/usr/bin/env bash
# The GPU check of loss=tiled (issue 24), on one CUDA GPU, in at most 8 minutes:
#   1. the CUDA tests, tests/losses/test_cuda.py (every loss against the float64 reference; tiled's own);
#   2. the loss benchmark at N=8192, V=128256, d=4096 in bf16 autocast: forward+backward time and peak
#      memory of cross_entropy, fused, tiled (and its deterministic and filtered variants), torch_lce,
#      liger, cce and the matmul floor, each in a fresh process;
#   3. a short training sweep, loss=fused,tiled, in bf16 (the default corpus, tokenizer and model);
# then one markdown report, <out>/report.md, with the GPU, the versions of torch and triton, each step's
# status and time, the tables and issue 24's goal. Each step has its own time limit (110 + 240 + 90 s);
# one that fails or times out is reported as such and the next still runs. Exit status: 0 when every
# step passed, 1 when one did not, 2 for bad arguments or no CUDA.
#
# Set up (a CUDA build of torch; liger and cce need the peers extra, else they are left out, named):
#   pip install -e ".[dev,peers]"
set -uo pipefail

usage() {
    echo "usage: scripts/gpu_check.sh [--out DIR]   (default: bench_results/gpu_check-<date>-<time>)"
}

out=""
while (($#)); do
    case "$1" in
    --out)
        if (($# < 2)); then
            echo "gpu_check.sh: --out needs a folder" >&2
            usage >&2
            exit 2
        fi
        out="$2"
        shift 2
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "gpu_check.sh: unknown argument: $1" >&2
        usage >&2
        exit 2
        ;;
    esac
done

if [[ -n $out && $out != /* ]]; then
    out="$PWD/$out" # the caller's folder, not the repository's
fi
cd "$(dirname "$0")/.." || exit 2
if ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check.sh: no CUDA GPU here (torch.cuda.is_available() is False): run it on a machine with one, with a CUDA build of torch" >&2
    exit 2
fi
out="${out:-bench_results/gpu_check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out" || exit 2
: >"$out/steps.tsv"

# step NAME LIMIT_S LOG COMMAND...: run it under its time limit, record "name status seconds limit".
step() {
    local name=$1 limit=$2 log=$3 start=$SECONDS status
    shift 3
    echo "$name: $* (at most $limit s; log: $out/$log)"
    timeout --kill-after=5 "$limit" "$@" >"$out/$log" 2>&1
    status=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$limit" >>"$out/steps.tsv"
    echo "$name: exit status $status after $((SECONDS - start)) s"
}

step tests 110 tests.log python -m pytest -n 0 -q -p no:cacheprovider tests/losses/test_cuda.py --junitxml="$out/tests.xml"
# A benchmark process per row, so that a row that fails or runs out of time costs only itself; the rows
# share the 240 s, each given what is left, 90 s at most.
read -r -a impls <<<"$(python -m losslab.gpu_check --bench-impls)"
bench_end=$((SECONDS + 240))
for impl in "${impls[@]}"; do
    left=$((bench_end - SECONDS))
    if ((left < 15)); then
        printf '%s\t%s\t%s\t%s\n' "bench-$impl" -1 0 0 >>"$out/steps.tsv" # not run: no time left
        continue
    fi
    step "bench-$impl" $((left < 90 ? left : 90)) "bench-$impl.log" python scripts/bench_losses.py --device cuda \
        --tokens 8192 --vocab 128256 --dim 4096 --dtypes bf16 --impls "$impl" --out-dir "$out/bench/$impl"
done
step train 90 train.log python train.py -m loss=fused,tiled precision=bf16 trainer.accelerator=gpu \
    trainer.max_steps=100 trainer.val_check_interval=50 hydra.sweep.dir="$out/train"
python -m losslab.gpu_check "$out"
