#!/usr/bin/env bash
# One call on a CUDA machine: build the CUDA extension, run the GPU tests (compute-sanitizer
# memcheck on both fused ops), run the benchmarks, and leave a table and a CSV under $OUT.
# Budget: about 8 minutes on an H100.
#
#   device run (from the repo root):  bash bench/gpu_check.sh       carry: [".bench_data"]
#   .bench_data/ holds the FashionMNIST IDX files: mkdir -p .bench_data &&
#       cp /usr/share/datasets/fashion-mnist/*.gz .bench_data/      (git-ignored)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export FASTUNLEARN_BENCH_CSV="$OUT/results.csv"
export FASTUNLEARN_DATA=${FASTUNLEARN_DATA:-$PWD/.bench_data}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
step() { echo; echo "== $* ($(date +%T))" | tee -a "$SUMMARY"; }
run() { "$@" 2>&1 | tee -a "$SUMMARY"; return "${PIPESTATUS[0]}"; }
status=0

step "device and versions"
run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
run python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step "build (CUDA + CPU extension)"
FASTUNLEARN_REQUIRE_NATIVE=1 pip install --no-deps --no-build-isolation -q -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log" | tee -a "$SUMMARY"; status=1; }
run python -c "import fastunlearn as fu; [print(f'{k:7s} {v}') for k, v in fu.backends().items()]"

step "GPU tests"
run timeout 240 python -m pytest -q -x tests/test_boundary_step.py tests/test_relabel_check.py tests/test_search.py \
  tests/test_api.py || status=1

step "compute-sanitizer memcheck: both ops, cuda and triton backends"
cat > "$OUT/memcheck_ops.py" <<'PY'
import torch
from fastunlearn.ops import boundary_step, relabel_check
for backend in ("cuda", "triton"):
    for shape in [(3, 3, 31, 17), (1, 1, 1, 1)]:
        u0 = torch.rand(shape, device="cuda")
        g = torch.randn(shape, device="cuda")
        for dt in (torch.float32, torch.bfloat16):
            boundary_step(u0.to(dt), u0.to(dt), g.to(dt), eps=0.1, alpha=0.05, gamma=0.5, lamda=0.1,
                          mean=[0.5] * shape[1], std=[0.25] * shape[1], backend=backend)
    for n, k in [(7, 10), (3, 5000), (0, 10)]:
        z = torch.randn(n, k, device="cuda")
        y = torch.randint(0, k, (n,), device="cuda")
        for mode in ("argmax", "nearest_incorrect", "soft", "topk"):
            relabel_check(z, y, mode=mode, want_grad=True, backend=backend)
torch.cuda.synchronize()
print("memcheck workload done")
PY
run timeout 180 compute-sanitizer --tool memcheck --error-exitcode 9 python "$OUT/memcheck_ops.py" || status=1

step "bench: boundary_step (38.5M fp32 elements) and relabel_check"
run timeout 120 python bench/bench_boundary_step.py || status=1
run timeout 90 python bench/bench_relabel_check.py || status=1

step "bench: search, AllCNN width 1 at 32x32 (3 channels) and ResNet-50 at 512x512"
run timeout 240 python bench/bench_search.py --n 8192 --width 1 --size 32 --channels 3 --train-epochs 0 --curve --compile || status=1
run timeout 120 python bench/bench_search.py --n 256 --arch resnet50 --size 512 --channels 3 --train-epochs 0 --reps 2 \
  || status=1

if [ -f bench/bench_e2e.py ]; then
  step "bench: end to end, FashionMNIST class 0, AllCNN width 1"
  run timeout 180 python bench/bench_e2e.py --width 1 --train-size 0 --train-epochs 3 || status=1
fi

step "done (status $status); CSV: $FASTUNLEARN_BENCH_CSV"
exit $status
