#!/usr/bin/env bash
# The GPU benchmark (issues 6 and 11), for a lent machine with one or two GPUs (device tool,
# kind nvidia-h200 or nvidia-h200-x2; stage i runs on cuda:{i % GPUs}): it has torch,
# transformers, grpcio and protobuf but no network. Regenerates the protobuf code there when
# grpc_tools is present (its protobuf runtime may differ from ours), then runs
# bench/gpu_bench.py with this script's arguments (e.g. --stage-counts 2,3,4, the default).
# Results: the table at the end of the output and $OUT/gpu_bench.json (mesh_overhead: batch-1
# mesh overhead per token at each stage count).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c 'import torch, transformers, grpc, google.protobuf as p; print("torch", torch.__version__, "transformers", transformers.__version__, "grpcio", grpc.__version__, "protobuf", p.__version__, "gpus", torch.cuda.device_count())'
if python3 -c 'import grpc_tools' 2>/dev/null; then
  python3 -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/llamadist.proto
elif [ -d .device_protos/protos ]; then
  # made here with the grpcio-tools release matching the device's grpcio (carried by the call)
  cp .device_protos/protos/llamadist_pb2*.py protos/
fi
python3 -c 'import protos.llamadist_pb2, psutil, safetensors' 
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python3 bench/gpu_bench.py "$@"
