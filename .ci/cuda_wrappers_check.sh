#!/usr/bin/env bash
# Syntax check of the CUDA ops' torch wrappers (csrc/cuda/*_torch.cpp) on a machine with a
# CPU build of torch and a CUDA toolkit but no GPU: g++ -fsyntax-only against torch's headers.
# A CPU wheel lacks a header torch generates at its CUDA build, and this toolkit may lack the
# cuBLAS / cuSPARSE / cuSOLVER headers that ATen/cuda/CUDAContext.h includes; the wrappers use
# none of them, so stand-ins declaring their handle types are enough. A wrapper that does not
# compile would otherwise first fail on the GPU machine, where it takes the whole CUDA build
# down with it.
#   usage: .ci/cuda_wrappers_check.sh   (PYTHON=.venv/bin/python by default)
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
inc=""
for d in "$(dirname "$(command -v nvcc 2>/dev/null || echo /none)")/../include" /usr/local/cuda/include /usr/local/cuda-*/include; do
  [ -f "$d/cuda_runtime_api.h" ] && inc="$d" && break
done
if [ -z "$inc" ]; then
  echo "cuda_wrappers_check: no CUDA toolkit headers (cuda_runtime_api.h) found" >&2
  exit 2
fi
stub="$(mktemp -d)"
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
for h in cusparse.h cublas_v2.h cublasLt.h cusolverDn.h cusolver_common.h; do
  [ -f "$inc/$h" ] && continue
  cat > "$stub/$h" <<'H'
#pragma once
typedef struct cusparseContext* cusparseHandle_t;
typedef struct cublasContext* cublasHandle_t;
typedef struct cublasLtContext* cublasLtHandle_t;
typedef struct cusolverDnContext* cusolverDnHandle_t;
typedef int cusparseStatus_t;
typedef int cublasStatus_t;
typedef int cusolverStatus_t;
H
done
flags=$("$PYTHON" -c "import sysconfig, torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths() + [sysconfig.get_paths()['include']]))") || exit 2
fail=0
for src in csrc/cuda/*_torch.cpp; do
  # The stand-ins come after the toolkit's own headers, so real ones win where they exist.
  if g++ -fsyntax-only -std=c++17 -Wall -Wno-c++20-extensions $flags -I"$inc" -I"$stub" -I csrc \
      -DTORCH_EXTENSION_NAME=_C "$src"; then
    echo "ok    $src"
  else
    echo "FAIL  $src" >&2
    fail=1
  fi
done
exit $fail
