#!/usr/bin/env bash
# Builds what a GPU window runs, on a machine without a GPU: the `kindling` binary and the `gpu`
# bench with `--features nccl` (CUDA, NCCL, Kindling's kernels), stripped and gzipped, into
# gpu-bundle/ (ignored by git; carry it to the GPU machine with the working tree). There
# `bash scripts/gpu-smoke.sh` unpacks and runs them. Sizes (Dec. 4): 72 and 54 MB stripped (most
# of it candle's PTX), 19.7 and 13.2 MB gzipped: together under the device tool's 64 MiB carry.
#
# nvcc and the CUDA libraries come from PyPI (scripts/cuda-from-pypi.sh); a cold build takes
# about 25 minutes on 2 cores (candle's kernels), a rebuild after a change in Kindling minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda-from-pypi.sh)"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
target="${CARGO_TARGET_DIR:-target/cuda-release}"
CARGO_TARGET_DIR="$target" cargo build --release --features nccl --bin kindling
bench=$(CARGO_TARGET_DIR="$target" cargo bench --features nccl --bench gpu --no-run \
  --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])' | tail -1)
mkdir -p gpu-bundle
for pair in "kindling:$target/release/kindling" "gpu:$bench"; do
  name=${pair%%:*}
  cp "${pair#*:}" "gpu-bundle/$name"
  strip "gpu-bundle/$name"
  gzip -9 -f "gpu-bundle/$name"
done
ls -l gpu-bundle
