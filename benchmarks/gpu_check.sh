#!/bin/bash
# The CUDA checks, prepared as one run for a lent GPU machine (its image holds torch, not our other deps).
#
#   bash benchmarks/gpu_check.sh fetch   # here, with registry access: Python 3.12 wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh run     # there (carry .whl): writes $OUT/gpu_check.log, $OUT/latency_cuda*.json
#
# `run` checks, each step on its own so one failure does not cost the others:
#   1. ms per chunk on the GPU, batch 1: MoDE/base fused cache vs in-place cache vs routing every step, its dense
#      twin and the equal-active DiT (the MoDE issue's target: cached >= 3x uncached)
#   2. tests/test_cuda.py (bf16 autocast training, torch.compile'd training step, GPU inference) and the MoDE tests
#   3. MoDE's cached path compiled with CUDA graphs, and under bf16 autocast
#   4. train.py under torchrun on the GPU (one rank: NCCL between ranks needs a second GPU) to a checkpoint
#   5. the whole chunk compiled (torch.compile of the traced chunk, robodit.deploy.export.trace) on the GPU next to
#      eager; then, on the machine's CPU, eager vs the ONNX Runtime and AOTInductor (compiled C++) artifacts of
#      `robodit export`, and tests/test_export.py (exported == eager within 1e-4)
# About 8 minutes on an H200 once the machine is up (compilation included).
set -u
cd "$(dirname "$0")/.."

# What `python3 -m pip list` on the GPU image lacks of what the checks import (robodit itself runs from the tree).
WHEELS="hydra-core==1.3.2 omegaconf==2.3.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
diffusers==0.39.0 importlib-metadata==8.7.0 onnxruntime==1.32.0 onnx==1.23.2 onnxscript==0.7.2 onnx-ir==1.1.0
ml-dtypes==0.7.0 flatbuffers==25.12.19"

case "${1:-}" in
fetch)
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    mkdir -p .whl
    PY=${PYTHON:-python3}
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS || exit 1
    # antlr4 4.9.3 (hydra's pin) ships as an sdist only: build its pure-Python wheel here.
    $PY -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3" || exit 1
    du -sh .whl && ls .whl
    ;;
run)
    OUT=${OUT:-/tmp/gpu_check_out}
    mkdir -p "$OUT"
    LOG="$OUT/gpu_check.log"
    exec > >(tee "$LOG") 2>&1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled HYDRA_FULL_ERROR=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

    # Most important first: a run cut short at the device's 10-minute limit still returns what it wrote.
    echo "== 1. latency on the GPU (batch 1): MoDE cached vs in-place vs routing every step"
    ROWS="mode/base ddim-5 To1 c10,mode-dense/base ddim-5 To1 c10,dit/base-d5 edm ddim-5 To1 c10,dit/base ddim-10"
    timeout 120 python3 benchmarks/latency.py --device cuda --repeats 50 --only "$ROWS" \
        --out "$OUT/latency_cuda.json" || echo "STEP 1 (fp32) FAILED"

    echo "== 2. CUDA tests and MoDE tests"
    timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_policy_mode.py \
        || echo "STEP 2 FAILED"

    echo "== 3. latency under CUDA graphs and bf16 autocast"
    # the cached path has no host syncs, so torch.compile can capture a whole denoiser call
    timeout 150 python3 benchmarks/latency.py --device cuda --repeats 50 --compile reduce-overhead \
        --only "mode/base ddim-5 To1 c10" --out "$OUT/latency_cuda_graphs.json" || echo "STEP 3 (CUDA graphs) FAILED"
    timeout 90 python3 benchmarks/latency.py --device cuda --repeats 50 --bf16 --only "mode/base ddim-5 To1 c10" \
        --out "$OUT/latency_cuda_bf16.json" || echo "STEP 3 (bf16) FAILED"

    echo "== 4. train.py under torchrun on the GPU (one rank)"
    python3 -c "
import sys; sys.path.insert(0, 'tests')
from conftest import make_toy_store
make_toy_store('/tmp/toy.zarr')" || echo "STEP 4 FAILED (store)"
    timeout 90 python3 -m torch.distributed.run --standalone --nproc_per_node=1 train.py policy=mode \
        policy.size=tiny dataset.path=/tmp/toy.zarr train.steps=20 train.device=cuda train.checkpoint_every=10 \
        train.progress=false logger=none out_dir=/tmp/ddp_nccl && ls /tmp/ddp_nccl/checkpoints \
        || echo "STEP 4 FAILED"
    echo "== 5. compiled whole chunk on the GPU; compiled and exported chunks on this machine's CPU"
    timeout 200 python3 benchmarks/latency.py --device cuda --repeats 50 --paths eager,compile \
        --only "dit/base ddim-10,mode/base ddim-5 To1 c10 cached" --out "$OUT/latency_cuda_compiled.json" \
        || echo "STEP 5 (GPU compiled) FAILED"
    timeout 360 python3 benchmarks/latency.py --device cpu --threads 2 --repeats 20 --paths eager,onnx,aoti,native \
        --only "dit/tiny ddim-10,dit/base ddim-10" --out "$OUT/latency_cpu_exported.json" \
        || echo "STEP 5 (CPU exported) FAILED"
    timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_export.py tests/test_export_native.py \
        || echo "STEP 5 (export tests) FAILED"
    echo "== done"
    ;;
*)
    echo "usage: bash benchmarks/gpu_check.sh fetch|run" >&2
    exit 2
    ;;
esac
