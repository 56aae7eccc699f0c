#!/usr/bin/env bash
# A CUDA toolkit for building `kindling --features cuda` on a machine without a GPU or a system
# CUDA install, from NVIDIA's PyPI wheels. Prints the environment to build with:
#
#   eval "$(bash scripts/cuda-from-pypi.sh)"
#   cargo build --release --features cuda
#
# What it sets up, under ${KINDLING_CUDA_HOME:-~/.cache/kindling/cuda13}:
# - a venv with nvidia-cuda-nvcc, -cuda-runtime, -cublas, -curand, -cuda-nvrtc and -cuda-cccl
#   13.0 (CCCL holds headers cuda_fp16.h includes, nv/target), with nvcc's own dependencies
#   nvidia-nvvm and -cuda-crt pinned to 13.0 too (unpinned, pip takes the newest, whose PTX
#   the 13.0 ptxas rejects: "Unsupported .version"). Only the CUDA 13 nvcc wheel
#   carries `nvcc` itself (the -cu12 wheels carry ptxas alone); candle 0.11's cudarc supports
#   CUDA 13.0. For `--features nccl`, NCCL from nvidia-nccl-cu13 (libnccl.so.2, ~300 MB).
# - CUDA_HOME with bin/ and include/ from the wheels and lib/ holding the unversioned names the
#   linker asks for (libcublas.so -> libcublas.so.13, ...).
# - lib/stubs/libcuda.so: the driver API is libcuda.so.1, installed by the NVIDIA driver, which a
#   GPU-less machine does not have. The toolkit ships a link-time stub for this case; the wheels
#   do not, so this builds one from the driver functions cudarc declares (empty bodies, soname
#   libcuda.so.1). The binary then loads the real driver on a GPU machine; it cannot run CUDA
#   here, which is the point of the stub.
# CUDA_COMPUTE_CAP defaults to 90 (H100); set it before for another GPU.
#
# KINDLING_CUDA_COMPILER_ONLY=1 installs the compiler and its headers alone (nvcc, nvvm, crt,
# cccl, the runtime's headers; ~250 MB instead of ~1.5 GB) in its own folder, enough for
# `cargo check --features nccl`, which runs candle's kernels through nvcc but links nothing.
# CI uses it (.ci/run).
set -euo pipefail
compiler_only="${KINDLING_CUDA_COMPILER_ONLY:-0}"
if [ "$compiler_only" = 1 ]; then
  root="${KINDLING_CUDA_HOME:-$HOME/.cache/kindling/cuda13-nvcc}"
else
  root="${KINDLING_CUDA_HOME:-$HOME/.cache/kindling/cuda13}"
fi
venv="$root/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvcc==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-crt==13.0.*" >&2
fi
if [ "$compiler_only" != 1 ]; then
  if [ ! -e "$root/.libraries" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-runtime==13.0.*" \
      "nvidia-cublas==13.0.*" "nvidia-curand" "nvidia-cuda-nvrtc==13.0.*" >&2
    touch "$root/.libraries"
  fi
  if [ ! -d "$("$venv/bin/python" -c 'import nvidia, os; print(nvidia.__path__[0])')/nccl" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check "nvidia-nccl-cu13" >&2
  fi
fi
wheel="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
home="$root/home"
mkdir -p "$home/lib/stubs"
ln -sfn "$wheel/bin" "$home/bin"
ln -sfn "$wheel/include" "$home/include"
ln -sfn "$wheel/nvvm" "$home/nvvm"
nccl="$(dirname "$wheel")/nccl/lib"
for lib in "$wheel"/lib/lib*.so.* "$nccl"/lib*.so.*; do
  [ -e "$lib" ] || continue  # no match: the glob stays as written
  name="$(basename "$lib")"
  ln -sfn "$lib" "$home/lib/${name%%.so.*}.so"
  ln -sfn "$lib" "$home/lib/$name"
done
if [ "$compiler_only" != 1 ] && [ ! -f "$home/lib/stubs/libcuda.so" ]; then
  # The driver functions cudarc links against, from its bindings in cargo's registry.
  cargo fetch --quiet >&2 || true
  sys="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*cudarc-0.19*/src/driver/sys/mod.rs' | sort | tail -1)"
  [ -n "$sys" ] || { echo "cudarc's sources are not in cargo's registry" >&2; exit 1; }
  grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | sed 's/pub unsafe fn //' | sort -u |
    sed 's/.*/void &(void) {}/' > "$home/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" "$home/lib/stubs/libcuda_stub.c"
fi
echo "export CUDA_HOME='$home' CUDA_PATH='$home'"
echo "export PATH='$home/bin':\"\$PATH\""
echo "export CUDA_COMPUTE_CAP='${CUDA_COMPUTE_CAP:-90}'"
