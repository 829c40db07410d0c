#!/usr/bin/env bash
# The GPU checks that the 2026-12-06 changes still owe (issues 16, 18, 20), as one device run.
# Prepare, on a machine with pip (see the device notes for the wheel platform flags):
#   pip download --no-deps -d .whl bitsandbytes==0.50.2 omegaconf==2.4.0 psutil galore-torch==1.0 q-galore-torch==1.0
#   pip wheel --no-deps -w .whl .                       # this tree as a wheel (package-dir mapping)
#   mkdir .base && git archive 3338d3d | tar -x -C .base   # the tree before the architecture change
# then run `bash benchmarks/gpu_acceptance.sh` on the GPU machine with .whl and .base carried.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_acceptance_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
# Issue 16: the 1B methods table, before (3338d3d) and after, same machine, each row its own process.
O="pretrain/llama_1b data.source=embedded data.batch_size=16 trainer.accumulate_grad_batches=1 model.activation_checkpointing=true data.num_workers=1 trainer.limit_val_batches=2 data.val_fraction=0.01 logger.wandb=false"
S="--set qgalore:trainer.precision=bf16-true --set galore:trainer.precision=bf16-true"
(cd .base && PYTHONPATH=$PWD:/tmp/site python3 benchmarks/methods.py $O --methods qgalore,galore --steps 10 $S --out /tmp/base) 2>&1 | tail -8 | tee "$OUT/methods_base.txt"
python3 benchmarks/methods.py $O --methods qgalore,galore --steps 10 $S --out /tmp/new 2>&1 | tail -8 | tee "$OUT/methods_new.txt"
# Issue 16: the CUDA tests of the merged tree.
pytest -m cuda -p no:cacheprovider -q --durations=15 tests > "$OUT/pytest_cuda.log" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest_cuda.log"
tail -5 "$OUT/pytest_cuda.log"
# Issue 20: the first step's SVD time at LLaMA-7B shapes; host time per matrix.
python3 benchmarks/first_step.py --json "$OUT/first_step.json" 2>&1 | tail -15
python3 benchmarks/overhead.py 2>&1 | tail -20 | tee "$OUT/overhead.txt"
# Issue 18: fine-tuning memory at 7B/8B shapes (one process a row).
python3 benchmarks/finetune_memory.py --shapes llama2-7b --batch 1 --seq 512 --steps 3 --out "$OUT/finetune_7b.json" 2>&1 | tail -10
python3 benchmarks/finetune_memory.py --shapes llama3-8b --batch 1 --seq 512 --steps 3 --out "$OUT/finetune_8b.json" 2>&1 | tail -10
