#!/usr/bin/env bash
# The GPU checks of issues 16, 18 and 20, in parts that each fit one 10-minute device call:
#   bash benchmarks/gpu_acceptance.sh tests      # CUDA tests (pytest-xdist; TESTS_ARGS: e.g. -k aligned); FIRST_STEP=1: 7B SVDs
#   bash benchmarks/gpu_acceptance.sh finetune   # fine-tuning memory at LLaMA-2-7B and Llama-3-8B shapes
#   bash benchmarks/gpu_acceptance.sh compare    # 1B qgalore before (3338d3d, .base) and after, alternating, twice
#   bash benchmarks/gpu_acceptance.sh compare_loop  # the same in a plain loop (no Lightning), torch.profiler tables
#   bash benchmarks/gpu_acceptance.sh aligned    # 1B's unaligned GEMMs, plain vs aligned rows (kernels/aligned.py)
#   bash benchmarks/gpu_acceptance.sh profile    # 1B plain loop, bf16 AdamW and qgalore: device busy vs wall
#   bash benchmarks/gpu_acceptance.sh methods    # 1B methods (qgalore, q-galore-torch, full); host time per matrix
#   bash benchmarks/gpu_acceptance.sh train7b    # LLaMA-7B qgl train: the run summary's first step
#   bash benchmarks/gpu_acceptance.sh quality    # 3000-step LLaMA-60M quality: SVD count and loss, galore/qgalore
# Several parts run in order: bash benchmarks/gpu_acceptance.sh tests compare
# Prepare, on a machine with pip (see the device notes for the wheel platform flags):
#   pip download --no-deps -d .whl bitsandbytes==0.50.2 omegaconf==2.4.0 galore-torch==1.0 q-galore-torch==1.0 \
#       pytest-xdist execnet
#   pip wheel --no-deps -w .whl .                       # this tree as a wheel (package-dir mapping)
#   mkdir .base && git archive 3338d3d | tar -x -C .base   # the tree before the architecture change
# and carry .whl (and .base for `methods`).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_acceptance_out}; mkdir -p "$OUT"
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, lightning, bitsandbytes; print(torch.__version__, lightning.__version__, bitsandbytes.__version__)"

ONE_B="pretrain/llama_1b data.source=embedded data.batch_size=16 trainer.accumulate_grad_batches=1 \
model.activation_checkpointing=true data.num_workers=1 trainer.limit_val_batches=2 data.val_fraction=0.01 logger.wandb=false"
METHODS=${METHODS:-qgalore,q-galore-torch,full}
BF16_TRUE=""  # every row of `methods` in bf16-true (--set names rows exactly)
for m in ${METHODS//,/ }; do [ "$m" = full ] || BF16_TRUE="$BF16_TRUE --set $m:trainer.precision=bf16-true"; done

[ $# -gt 0 ] || set -- usage
for part in "$@"; do
echo "== $part $(date -u +%H:%M:%S)"
case "$part" in
tests)
    # Triton's autotuning compiles on the host: 8 workers share the 16 cores and the one GPU.
    timeout ${TESTS_TIMEOUT:-330} pytest -m cuda -n 8 -p no:cacheprovider -q --durations=10 ${TESTS_ARGS:-} tests > "$OUT/pytest_cuda.log" 2>&1
    echo "pytest rc=$?" >> "$OUT/pytest_cuda.log"; tail -25 "$OUT/pytest_cuda.log"
    if [ "${FIRST_STEP:-0}" = 1 ]; then
        timeout 200 python3 benchmarks/first_step.py --repeats 1 --json "$OUT/first_step.json" 2>&1 | tee "$OUT/first_step.txt"
    fi
    ;;
compare)
    # Issue 16: not slower than before the architecture change. Host-bound rows vary with the machine
    # and from run to run: the two trees alternate on one machine, twice, STEPS steps a row.
    STEPS=${STEPS:-30}  # rows report tokens/s after step 1 and over the second half of the steps
    for round in 1 2; do
        (cd .base && PYTHONPATH=$PWD:/tmp/site timeout 150 python3 benchmarks/methods.py $ONE_B --methods qgalore \
            --steps $STEPS --set qgalore:trainer.precision=bf16-true --out /tmp/base$round) 2>&1 | tail -3 \
            | tee "$OUT/compare_base$round.txt"
        timeout 120 python3 benchmarks/methods.py $ONE_B --methods qgalore --steps $STEPS \
            --set qgalore:trainer.precision=bf16-true --out /tmp/new$round 2>&1 | tail -3 | tee "$OUT/compare_new$round.txt"
        cp /tmp/base$round/results.json "$OUT/compare_base$round.json"; cp /tmp/new$round/results.json "$OUT/compare_new$round.json"
    done
    ;;
compare_loop)
    # Is the difference of `compare` in the Lightning path or in the optimizer and layers? The plain
    # loop of benchmarks/train_step.py, each tree, alternating; --profile prints device time per kernel.
    LOOP="--model 1b --checkpointing --rank 512 --methods qgalore --check-finite --steps 30 --warmup 5 --profile"
    for round in $(seq 1 ${LOOP_ROUNDS:-2}); do
        (cd /tmp && PYTHONPATH=$OLDPWD/.base:/tmp/site timeout 150 python3 $OLDPWD/.base/benchmarks/train_step.py $LOOP) \
            > "$OUT/loop_base$round.txt" 2>&1; grep -m3 "qgalore" "$OUT/loop_base$round.txt"
        (cd /tmp && timeout 120 python3 $OLDPWD/benchmarks/train_step.py $LOOP) > "$OUT/loop_new$round.txt" 2>&1
        grep -m3 "qgalore" "$OUT/loop_new$round.txt"
    done
    ;;
aligned)
    # Issue 20: LLaMA-1B's 5461-wide GEMMs, plain against 16-byte aligned rows (kernels/aligned.py).
    timeout ${ALIGNED_TIMEOUT:-120} python3 benchmarks/aligned_gemm.py 2>&1 | tee "$OUT/aligned_gemm.txt"
    ;;
profile)
    # Issue 20: is the 1B step bound by the host or the device? The plain loop (no Lightning) of bf16
    # AdamW and qgalore, device busy time against wall time, the top kernels and host ops.
    (cd /tmp && timeout ${PROFILE_TIMEOUT:-200} python3 $OLDPWD/benchmarks/train_step.py --model 1b --checkpointing \
        --rank 512 --methods bf16-adamw,qgalore --check-finite --steps 12 --warmup 4 --profile) > "$OUT/profile.txt" 2>&1
    grep -E "device busy|^\| " "$OUT/profile.txt"
    ;;
finetune)
    for shape in llama2-7b llama3-8b; do
        timeout 285 python3 benchmarks/finetune_memory.py --shapes $shape --batch 1 --seq 512 --steps 4 \
            --timeout 100 --out "$OUT/finetune_$shape.json" 2>&1 | tee "$OUT/finetune_$shape.txt"
    done
    ;;
methods)
    # Issue 20: ratios to bf16 AdamW and q-galore-torch, one machine.
    timeout ${METHODS_TIMEOUT:-270} python3 benchmarks/methods.py $ONE_B --methods $METHODS \
        --steps ${STEPS:-20} $BF16_TRUE --out /tmp/new 2>&1 | tail -8 | tee "$OUT/methods_new.txt"
    cp /tmp/new/results.json "$OUT/methods_new.json"
    [ "${OVERHEAD:-1}" = 0 ] || timeout 60 python3 benchmarks/overhead.py 2>&1 | tail -30 | tee "$OUT/overhead.txt"
    ;;
train7b)
    # Issue 20: LLaMA-7B, batch 1 x 256: the run summary's first optimizer step and tokens/s.
    (cd /tmp && timeout ${TRAIN7B_TIMEOUT:-500} python3 -m qgl train pretrain/llama_7b data.source=embedded data.batch_size=1 \
        trainer.accumulate_grad_batches=1 trainer.precision=bf16-true trainer.max_steps=8 trainer.limit_val_batches=1 \
        data.num_workers=1 logger.wandb=false) 2>&1 | tail -40 | tee "$OUT/train_7b.txt"
    ;;
quality)
    timeout 560 python3 benchmarks/quality.py --recipe pretrain/llama_60m --methods ${QUALITY_METHODS:-galore,qgalore} \
        --steps 3000 --val-every ${VAL_EVERY:-300} --time-limit 520 data.source=embedded data.batch_size=16 trainer.accumulate_grad_batches=1 \
        data.val_fraction=0.02 data.num_workers=1 optim.warmup_steps=150 logger.wandb=false ${QUALITY_SETS:-} \
        --out "$OUT/quality" 2>&1 | tail -20
    ;;
*)
    echo "usage: bash benchmarks/gpu_acceptance.sh PART [PART ...], PART: tests|finetune|compare|compare_loop|aligned|profile|methods|train7b|quality"
    exit 2
    ;;
esac
done
# The device returns at most 8 files: PACK=1 folds everything under $OUT into one archive.
if [ "${PACK:-0}" = 1 ]; then
    tar czf /tmp/acceptance.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/acceptance.tgz "$OUT/"
fi
