// relabel_check on CUDA: a plain launcher over raw pointers, free of torch headers so
// it can be compiled (and reused) without PyTorch. Semantics: reference.relabel_check.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "relabel_modes.h"

namespace fastunlearn {
namespace cuda {

// Element type of the logits buffer.
enum RelabelLogitsType : int { kRelabelFloat32 = 0, kRelabelBFloat16 = 1, kRelabelFloat16 = 2 };

// logits: (n, k) row-major; y: (n,) labels in [0, k) (validated by the caller; a label
// outside the range is never dereferenced, its row gets margin NaN and no one-hot).
// mode: a RelabelMode (relabel_modes.h). targets: (n, k) float32, written
// for kSoft and kTopk (may be null otherwise); dlogits: (n, k) float32 = softmax - onehot(y),
// written when want_grad (may be null otherwise). Asynchronous on `stream`; returns the
// launch error, or cudaErrorInvalidValue for arguments it cannot handle (k >= 2^31).
cudaError_t launch_relabel_check(const void* logits, int logits_type, const int64_t* y, int64_t n, int64_t k,
                                 int mode, int64_t topk, bool want_grad, int64_t* relabel, bool* success,
                                 float* margin, float* targets, float* dlogits, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastunlearn
