// The fastunlearn operator namespace: every schema is defined here, once.
// Backends register implementations with TORCH_LIBRARY_IMPL in their own files
// (csrc/<op>.cpp for CPU, csrc/cuda/<op>_torch.cpp for CUDA); the Triton kernels are
// separate triton_op registrations made from Python (kernels/<op>.py).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastunlearn, m) {
  // noise: 0 normal, 1 laplace, 2 cauchy, 3 uniform(-1, 1). quantize: 0 = off.
  // mean/std: per-channel (C,) float32; when std is given, grad is w.r.t. (u - mean) / std.
  m.def(
      "boundary_step(Tensor u, Tensor u0, Tensor grad, float eps, float alpha, float lamda, "
      "float gamma, int noise, int quantize, int seed, int offset, Tensor? mean, Tensor? std) "
      "-> Tensor");
  // mode: 0 argmax, 1 nearest_incorrect, 2 soft, 3 topk. targets / dlogits come back as
  // (0,)-shaped tensors when the mode / want_grad does not ask for them.
  m.def(
      "relabel_check(Tensor logits, Tensor y, int mode, int topk, bool want_grad) "
      "-> (Tensor relabel, Tensor success, Tensor margin, Tensor targets, Tensor dlogits)");
  // Training-mode BatchNorm2d over (N, C, H, W), then max(., 0) when relu. weight, bias and
  // the running statistics are float32 (C,). The op is functional (so it can carry an autograd
  // formula): it leaves running_mean / running_var as they are and returns their updated values
  // (momentum, the unbiased variance, as torch.nn.functional.batch_norm computes them), or
  // (0,)-shaped tensors when they are not given; ops.batch_norm_relu copies them back.
  m.def(
      "batch_norm_relu(Tensor x, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, "
      "float momentum, float eps, bool relu) -> (Tensor y, Tensor mean, Tensor invstd, Tensor new_running_mean, "
      "Tensor new_running_var)");
  m.def(
      "batch_norm_relu_backward(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor invstd, "
      "bool relu) -> (Tensor dx, Tensor dweight, Tensor dbias)");
}

// The Python module itself only carries the build facts; the ops live in torch.ops.fastunlearn.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef FASTUNLEARN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
