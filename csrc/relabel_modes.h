// Relabel mode codes, as in the op schema: the position of each name in
// reference.RELABEL_MODES (tests/ops/test_codes.py checks that they agree). Free of torch
// headers, so the CUDA kernels include it too.
#pragma once

namespace fastunlearn {

enum RelabelMode : int { kArgmax = 0, kNearestIncorrect = 1, kSoft = 2, kTopk = 3 };

}  // namespace fastunlearn
