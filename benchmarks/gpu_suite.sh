#!/usr/bin/env bash
# Issue 17's GPU measurements in one run (a few minutes on one GPU; needs CUDA):
#   bash benchmarks/gpu_suite.sh 2>&1 | tee gpu_suite.log
# MobileNetV2 @224 batch 128 (channels_last, bf16 autocast), ResNet-34 separable @32 batch 512,
# the 4-block flow, then MobileNetV2 again with the training forward compiled whole.
set -euo pipefail
cd "$(dirname "$0")"
python -m pytest -q ../tests/test_host_syncs.py -k reads_nothing   # sync-debug mode "error" on CUDA
python training_overhead.py --device cuda --cases a --batch a=128 --steps 20 --amp bf16 --channels-last
python training_overhead.py --device cuda --cases b --batch b=512 --steps 20 --amp bf16
python invertible_overhead.py --device cuda --cases b --batch b=128 --steps 20
python training_overhead.py --device cuda --cases a --batch a=128 --steps 20 --amp bf16 --channels-last \
    --compile --variants plain,lipfx,torch-sn
