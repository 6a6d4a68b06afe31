#!/usr/bin/env bash
# Compile-only check of every CUDA kernel source (csrc/cuda/*.cu) for sm_80 and sm_90.
# Needs nvcc but no GPU and no CUDA build of torch: the .cu files include only the CUDA
# runtime headers and csrc/. Exits non-zero when any file fails for any architecture.
#   usage: .ci/nvcc_check.sh   (NVCC=/path/to/nvcc picks the compiler, NVCC_WERROR=0 allows warnings)
set -u
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ]; then
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    [ -x "$d/nvcc" ] && NVCC="$d/nvcc" && break
  done
fi
if [ -z "$NVCC" ]; then
  echo "nvcc_check: nvcc not found (put it on PATH or set NVCC)" >&2
  exit 2
fi

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "nvcc_check: no csrc/cuda/*.cu files" >&2
  exit 2
fi

# Warnings fail the check too, unless NVCC_WERROR=0.
werror=()
[ "${NVCC_WERROR:-1}" != "0" ] && werror=(-Werror all-warnings)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail=0
for src in "${sources[@]}"; do
  for arch in 80 90; do
    obj="$tmp/$(basename "$src" .cu).sm_$arch.o"
    if "$NVCC" -c "$src" -o "$obj" -std=c++17 -O3 -I csrc \
        -gencode "arch=compute_$arch,code=sm_$arch" -Xcompiler -Wall ${werror[@]+"${werror[@]}"}; then
      echo "ok    $src sm_$arch"
    else
      echo "FAIL  $src sm_$arch" >&2
      fail=1
    fi
  done
done
exit $fail
