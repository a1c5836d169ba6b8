#!/usr/bin/env bash
# The one prepared CUDA check (run on a lent GPU machine from the repo root; see benchmarks/RESULTS.md).
# Expects torch with CUDA, and deqlab's pure-Python dependencies missing there (torchdyn, torchcde,
# torchsde, trampoline, jsonargparse, torchdeq) as wheels in .whl/, and MNIST's raw files gzipped in
# .gpudata/. Writes logs and the updated RESULTS.md under $OUT.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
DATA=/tmp/data
mkdir -p $DATA/MNIST/raw
for f in .gpudata/*.gz; do [ -e "$f" ] && gunzip -c "$f" > $DATA/MNIST/raw/$(basename "$f" .gz); done
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee $OUT/device.txt
echo "== CUDA tests"; python3 -m pytest -q -p no:cacheprovider tests/nn/test_nn_cuda.py tests/nn/test_nn_memory.py \
  tests/solvers/test_solvers_cuda.py tests/solvers/test_compiled_blocks.py 2>&1 | tail -4 | tee $OUT/cuda_tests.txt
echo "== quickstart on cuda"; python3 docs/quickstart_example.py --device cuda 2>&1 | tail -4
echo "== paper_repro/mnist.py --gpus 1"; /usr/bin/time -f "wall %e s" python3 paper_repro/mnist.py --model-type skip \
  --gpus 1 --max-steps 400 --data-dir $DATA --test-subset 2560 --num-workers 4 --progress lines --log-every 100 \
  --log-dir /tmp/runs --results-dir $OUT 2>&1 | grep -vE "^\s*$|Warning|warn" | tail -25
echo "== paper_repro/mnist.py --gpus 1, compiled solver steps replayed as CUDA graphs"; /usr/bin/time -f "wall %e s" \
  python3 paper_repro/mnist.py --model-type skip --gpus 1 --max-steps 200 --data-dir $DATA --test-subset 2560 \
  --num-workers 4 --progress lines --log-every 100 --log-dir /tmp/runs_graphs --results-dir $OUT/graphs \
  --model-option compile_solver=True --model-option solver_check_every=4 --model-option cuda_graphs=True \
  2>&1 | grep -vE "^\s*$|Warning|warn" | tail -12
echo "== paper_repro/cifar10.py --arch small --gpus 1 on generated CIFAR-10 (throughput, NFE)"; timeout 240 python3 \
  benchmarks/cifar10_generated.py --n-train 7680 --n-test 1280 --out $OUT/cifar --gpus 1 --arch small --model-type skip \
  --solver discrete --max-steps 60 --override pretrain_steps=10 --num-workers 4 --log-every 20 2>&1 \
  | grep -vE "^\s*$|Warning|warn" | tail -8
echo "== per-sample early exit (CUDA)"; timeout 120 python3 benchmarks/per_sample_exit.py --device cuda --data-dir $DATA \
  --output $OUT/per_sample_exit_cuda.md 2>&1 | grep -E "^\|" | tail -10
echo "== solver benchmark"; timeout 120 python3 benchmarks/solvers.py --device cuda --quick --no-breakdown \
  2>&1 | tee $OUT/solvers_cuda.txt | grep -E "^\|" | tail -30
echo "== compiled solver steps and CUDA graphs (eager | compiled | check_every=4 blocks captured)"; timeout 300 python3 \
  benchmarks/solvers.py --device cuda --quick --no-breakdown --no-torchdeq --workloads dense --compile --block 4 \
  --no-write 2>&1 | tee $OUT/solvers_compiled_cuda.txt | grep -E "^\|" | tail -8
echo "== training-step benchmark (paper models, paper batch sizes, CUDA)"; timeout 300 python3 benchmarks/train_step.py \
  --device cuda --repeats 5 --warmup 2 --prediction --data-dir $DATA --output $OUT/train_step_cuda.md \
  2>&1 | tee $OUT/train_step_cuda.txt | grep -E "^\||^#" | tail -40
echo "== training-step, compiled maps (CUDA, MNIST dense + CIFAR small, vanilla discrete)"; timeout 300 python3 \
  benchmarks/train_step.py --device cuda --compile --solvers discrete --model-types vanilla --repeats 5 --no-breakdown --no-torchdeq \
  --no-write --output $OUT/train_step_compile_cuda.md 2>&1 | grep -E "^\||^#" | tail -20
echo "== backward benchmark"; timeout 120 python3 benchmarks/backward.py --device cuda --quick 2>&1 | grep -E "^\|" | tail -30
cp benchmarks/RESULTS.md $OUT/ 2>/dev/null
exit 0
