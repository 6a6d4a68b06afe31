#!/usr/bin/env bash
# One call on a CUDA machine: build the CUDA extension, run one preset of GPU tests and
# benchmarks, and leave a table (summary.txt) and a CSV (results.csv) under $OUT.
#
#   device run (from the repo root):  PRESET=clinical FASTUNLEARN_COMMIT=<sha> bash bench/gpu_check.sh
#                                     carry: [".bench_data"]
#   (the device's copy of the tree may keep an older git HEAD: FASTUNLEARN_COMMIT names the
#   commit sent, for the CSV rows and the summary)
#
# Each preset fits one call of about 8 minutes (BUDGET_S, default 480 s; a step gets at most
# its own limit and what is left; steps the budget does not reach are listed as skipped):
#   clinical  ResNet-50 (ImageNet stem) at 512 x 512 on RetinaMNIST's fundus photographs,
#             upscaled on the host: the search against the authors' loop with every precision
#             variant named explicitly and every rep reported, a profiler table of one chunk;
#             the end to end at the authors' clinical batch of 16; then tests/engine/test_cuda.py.
#   e2e       AllCNN (width 1) on FashionMNIST class 0: ours cold and warm against the rewrite
#             with its data in memory and loading PIL images as the authors' code does; the
#             first-use table; a warm revision split by phase.
#   ops       the three fused ops: their GPU tests, compute-sanitizer on batch_norm_relu, and
#             their benchmarks (boundary_step, relabel_check, batch_norm_relu, thin conv).
#   stream    unlearning from image files: bench/bench_stream.py writes STREAM_N (default 50,000)
#             JPEGs of 3x224x224 and a CSV to the device's local disk (a temporary folder, not
#             $OUT; removed afterwards) and forgets them all with ResNet-18 (ImageNet stem; precision auto),
#             STREAM_WORKERS DataLoader workers (default: the cores less 2): images/s of decode
#             alone, search and the whole job, against the same job from tensors (a 4096-image
#             subset), loader- or compute-bound, the GPU's mean utilisation in each, peak RSS;
#             2 reps (the first pays the set-up). Nothing is trained or fetched.
#   zoo       (optional) every model of bench/zoo.py (AllCNN 0.25 and 1, the clinic CNN, ResNet-18
#             CIFAR stem, ResNet-50 at 224 px / 512 px for the search, the small ViT), each in a
#             fresh process against the authors' loop: the search, the end to end, a revision.
# STEPS="..." runs the named steps instead (any of: build search-clinical e2e-clinical
# tests-cuda e2e-clinical-noisy e2e cold revision tests-ops memcheck ops e2e-fused e2e-variants search
# stream zoo-search zoo-e2e zoo-revision).
#
# .bench_data/ (git-ignored) holds what the presets read, so nothing is fetched or retrained:
#   mkdir -p .bench_data && cp /usr/share/datasets/fashion-mnist/*.gz ../shared/data/retinamnist.npz .bench_data/
# plus, once a run has trained it, the AllCNN original (allcnn_w1.safetensors, returned under
# $OUT). The ResNet-50 originals are trained on the device for 3 epochs (about 10 s there):
# 100 MB of weights would not fit the 64 MiB a call carries.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export FASTUNLEARN_BENCH_CSV="$OUT/results.csv"
export FASTUNLEARN_DATA=${FASTUNLEARN_DATA:-$PWD/.bench_data}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-480}
PRESET=${PRESET:-clinical}
case "$PRESET" in
  clinical) DEFAULT_STEPS="build search-clinical e2e-clinical tests-cuda e2e-clinical-noisy" ;;
  e2e) DEFAULT_STEPS="build e2e cold revision" ;;
  ops) DEFAULT_STEPS="build tests-ops memcheck ops" ;;
  stream) DEFAULT_STEPS="build stream" ;;
  zoo) DEFAULT_STEPS="build zoo-search zoo-e2e zoo-revision" ;;
  *) echo "PRESET must be clinical, e2e, ops, stream or zoo, got '$PRESET'" >&2; exit 2 ;;
esac
STEPS=${STEPS:-$DEFAULT_STEPS}
END=$(( $(date +%s) + BUDGET_S ))
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
status=0
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo; echo "== $* ($(date +%T), $(( END - $(date +%s) ))s left)" | tee -a "$SUMMARY"; }
# run LIMIT cmd...: at most LIMIT seconds and never past the budget; skipped with under 20 s left.
run() {
  local limit=$1; shift
  local left=$(( END - $(date +%s) ))
  if (( left < 20 )); then echo "skipped (budget spent): $*" | tee -a "$SUMMARY"; return 0; fi
  (( left < limit )) && limit=$left
  timeout "$limit" "$@" 2>&1 | tee -a "$SUMMARY"
  local rc=${PIPESTATUS[0]}
  (( rc == 124 )) && echo "timed out after ${limit}s: $*" | tee -a "$SUMMARY"
  (( rc != 0 )) && status=1
  return 0
}

step "preset $PRESET: $STEPS; device and versions; commit ${FASTUNLEARN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
run 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
run 60 python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"

if want build; then
step "build (CUDA + CPU extension, MAX_JOBS=$MAX_JOBS)"
if ! FASTUNLEARN_REQUIRE_NATIVE=1 timeout 300 python -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -30 | tee -a "$SUMMARY"
  status=1
  # Without the CUDA build the package still runs (Triton / eager on the GPU).
  python -m pip install --no-deps --no-build-isolation -q -e . >> "$OUT/build.log" 2>&1 || FASTUNLEARN_SKIP_NATIVE=1 \
    python -m pip install --no-deps --no-build-isolation -q -e . >> "$OUT/build.log" 2>&1
fi
fi
run 60 python -c "import fastunlearn as fu; [print(f'{k:7s} {v}') for k, v in fu.backends().items()]"

# One pytest per file: a file that runs past its limit does not take the others' reports with it.
pytest_files() {
  local limit=$1; shift
  for f in "$@"; do
    run "$limit" python -m pytest -q -rf --tb=short --maxfail=5 --durations=5 -p no:cacheprovider -k "${TESTS_K:-}" "$f"
  done
}

# ------------------------------------------------------------------ clinical
CLINICAL=(--dataset retina --arch resnet50 --size 512 --train-epochs 3 --train-precision bf16)
if want search-clinical; then
step "bench: search, ResNet-50 (ImageNet stem) at 512x512, RetinaMNIST upscaled, 512 samples; every variant, 3 reps"
run 150 python bench/bench_search.py "${CLINICAL[@]}" --n 512 --reps 3 \
  --variants fp32,fp32-ieee,bf16-norecheck,bf16,bf16-tf32recheck,bf16-autotuned --profile "$OUT/profile_search"
fi
if want e2e-clinical; then
step "bench: end to end, ResNet-50 at 512, RetinaMNIST class 0 (486 images), batch 16, 10 epochs, bf16"
run 150 python bench/bench_e2e.py "${CLINICAL[@]}" --train-size 0 --batch-size 16 --precision bf16 \
  --warm-reps 0 --ours-reps 2 --no-authors-split
fi
if want tests-cuda; then
step "GPU tests: the engine on CUDA (search at 512 px, recheck, out of memory, precision flags, fine-tune, graphs)"
pytest_files 150 tests/engine/test_cuda.py
fi
if want e2e-clinical-noisy; then
step "bench: the same end to end with gamma 1e-4 (a search per batch), 3 epochs"
run 90 python bench/bench_e2e.py "${CLINICAL[@]}" --train-size 0 --batch-size 16 --precision bf16 \
  --warm-reps 0 --ours-reps 1 --no-authors-split --gamma 1e-4 --epochs 3
fi

# ----------------------------------------------------------------------- e2e
MODEL="$FASTUNLEARN_DATA/allcnn_w1.safetensors"
E2E=(python bench/bench_e2e.py --width 1 --train-size 0 --train-epochs 3 --model "$MODEL")
if want e2e; then
step "bench: end to end, FashionMNIST class 0, AllCNN width 1, bf16: cold, then 3 warm; the rewrite in memory and with PIL loading"
run 200 "${E2E[@]}" --precision bf16 --ours-reps 3 --authors-pil --profile "$OUT/profile_e2e"
gzip -f "$OUT/profile_e2e/trace.json" 2>/dev/null
# The original trained here comes back with the results: put it in .bench_data/ to reuse it.
[[ -f "$MODEL" ]] && cp "$MODEL" "$OUT/"
fi
if want cold; then
step "bench: what the first fu.unlearn of a process pays (1 epoch, first call vs second, by phase and op), bf16 and fp32"
run 90 python bench/bench_cold_start.py --width 1 --train-size 0 --train-epochs 3 --epochs 1 --model "$MODEL" \
  --precision bf16 --profile "$OUT/profile_cold"
gzip -f "$OUT/profile_cold/first_use_trace.json" 2>/dev/null
run 60 python bench/bench_cold_start.py --width 1 --train-size 0 --train-epochs 3 --epochs 1 --model "$MODEL" --precision fp32
fi
if want revision; then
step "bench: where a warm revision's time goes (64 samples and the whole class; fp32 and bf16)"
run 150 python bench/bench_revision.py --width 1 --train-size 0 --train-epochs 3 --model "$MODEL" --sizes 64,all \
  --precisions "${REVISION_PRECISIONS:-fp32,bf16}" --reps 5 --profile "$OUT/profile_revision"
# One file: the results come back as a limited number of files.
tar -czf "$OUT/profile_revision.tar.gz" -C "$OUT" profile_revision 2>/dev/null && rm -rf "$OUT/profile_revision"
fi
if want e2e-fused; then
step "bench: end to end as above, the train step's BatchNorm + ReLU through the CUDA batch_norm_relu (fuse_batch_norm=True)"
run 120 "${E2E[@]}" --precision bf16 --fuse-batch-norm on --no-authors-split --warm-reps 7
fi
if want e2e-variants; then
step "bench: end to end with a 2048-sample search chunk; with a plain eager step; with the compiled step"
run 90 "${E2E[@]}" --precision bf16 --search-batch-size 2048 --no-authors-split --warm-reps 0
run 120 "${E2E[@]}" --precision bf16 --cuda-graph off --no-authors-split
run 150 "${E2E[@]}" --precision bf16 --compile on --no-authors-split
fi

# ----------------------------------------------------------------------- ops
if want tests-ops; then
step "GPU tests: boundary_step, relabel_check, batch_norm_relu on the cuda and triton backends"
pytest_files 120 tests/ops/test_boundary_step.py tests/ops/test_relabel_check.py tests/ops/test_batch_norm_relu.py
fi
if want memcheck; then
step "compute-sanitizer memcheck: batch_norm_relu (cuda), odd shapes, both layouts and dtypes"
cat > "$OUT/memcheck_ops.py" <<'PY'
import torch
from fastunlearn.ops import batch_norm_relu
for shape in [(3, 5, 7, 9), (2, 1, 1, 3), (64, 40, 3, 3), (1, 70, 2, 2)]:
    for dt in (torch.float32, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape, device="cuda").to(dt).contiguous(memory_format=fmt).requires_grad_(True)
            c = shape[1]
            batch_norm_relu(x, torch.ones(c, device="cuda"), torch.zeros(c, device="cuda"),
                            torch.zeros(c, device="cuda"), torch.ones(c, device="cuda"), backend="cuda").sum().backward()
torch.cuda.synchronize()
print("memcheck workload done")
PY
run 120 compute-sanitizer --tool memcheck --error-exitcode 9 python "$OUT/memcheck_ops.py"
fi
if want ops; then
step "bench: boundary_step, relabel_check, batch_norm_relu, the thin first convolution, training and prediction"
run 60 python bench/bench_boundary_step.py --no-reference
run 45 python bench/bench_relabel_check.py
run 90 python bench/bench_batch_norm_relu.py --step-widths 1 --layouts cl
run 60 python bench/bench_thin_conv.py
run 60 python bench/bench_train_eval.py --width 1 --train-size 2560 --eval-size 10000
fi
if want search; then
step "bench: search, AllCNN width 1 at 32x32 (3 channels), fp32 and bf16"
run 120 python bench/bench_search.py --n 8192 --width 1 --size 32 --channels 3 --train-epochs 0 \
  --variants fp32,bf16-norecheck,bf16 --curve --compile
fi

# -------------------------------------------------------------------- stream
if want stream; then
STREAM_N=${STREAM_N:-50000}
STREAM_WORKERS=${STREAM_WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
step "bench: unlearning from $STREAM_N JPEG files at 224 px, ResNet-18 (ImageNet stem), precision auto (bf16 on a GPU), $STREAM_WORKERS workers: decode / search / job images/s, files vs tensors, GPU utilisation"
run 330 python bench/bench_stream.py --n "$STREAM_N" --size 224 --arch resnet18 --imagenet-stem \
  --workers "$STREAM_WORKERS" --epochs 1 --batch-size 128 --tensor-subset 4096 --reps 2 --util-interval 0.5
fi

# ----------------------------------------------------------------------- zoo
if want zoo-search; then
step "bench: zoo, the search against the authors' loop, default precision and fp32 / bf16 named, 3 reps"
run 200 python bench/bench_search.py --zoo --variants auto,fp32,bf16 --reps 3
fi
if want zoo-e2e; then
step "bench: zoo, end to end with the defaults (FashionMNIST class 0 of 6000, 10 epochs), each a fresh process"
run 200 python bench/bench_e2e.py --zoo --warm-reps 3
fi
if want zoo-revision; then
step "bench: zoo, a warm revision of 64 samples against the authors' loop on the same samples"
run 80 python bench/bench_revision.py --zoo --sizes 64 --reps 3
fi

step "done (status $status); CSV: $FASTUNLEARN_BENCH_CSV"
exit $status
