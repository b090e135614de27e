// Synchronised BatchNorm as a libtorch autograd function (tch cannot define one in Rust), built by
// worker/build.rs against the libtorch that tch links. The collectives stay in Rust: the function
// calls back through a C function pointer for the statistics' all-gather (forward) and the gradient
// sums' all-reduce (backward). worker/src/engine/syncbn.rs has the maths and the Rust side.
//
// Forward: each rank's per-channel count, mean and biased variance, all-gathered as one row of
// 1 + 2C floats, combined in rank order in double (parallel-variance formula); the output is
// (x - mean) * weight * invstd + bias with those global statistics; the running statistics take the
// global mean and the unbiased global variance.
// Backward, with N the global count and xmu = x - mean:
//   sum_dy = sum(dy), sum_dy_xmu = sum(dy * xmu) per channel over this rank's share, all-reduced;
//   dx = (dy - sum_dy / N - xmu * invstd^2 * sum_dy_xmu / N) * invstd * weight;
//   dweight and dbias from this rank's sums (the trainer sums parameter gradients over ranks).

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" {
// op 0: all-gather along dimension 0; op 1: all-reduce (sum). Returns a new tensor the caller owns,
// or nullptr when the collective failed (the Rust side keeps the error).
typedef at::Tensor *(*simclr_collective_fn)(void *context, int op, const at::Tensor *input);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Collective {
  simclr_collective_fn call;
  void *context;

  at::Tensor run(int op, const at::Tensor &input) const {
    at::Tensor *out = call(context, op, &input);
    if (out == nullptr) {
      throw std::runtime_error(op == 0 ? "sync batch norm: all-gather failed"
                                       : "sync batch norm: all-reduce failed");
    }
    at::Tensor result = *out;
    delete out;
    return result;
  }
};

bool is_reduced(at::ScalarType kind) { return kind == at::kBFloat16 || kind == at::kHalf; }

std::vector<int64_t> reduced_dims(const at::Tensor &x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

std::vector<int64_t> channel_shape(const at::Tensor &x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  return shape;
}

struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  static at::Tensor forward(AutogradContext *ctx, at::Tensor x, at::Tensor weight, at::Tensor bias,
                            at::Tensor running_mean, at::Tensor running_var, double eps,
                            double momentum, int64_t call, int64_t context) {
    const Collective collective{reinterpret_cast<simclr_collective_fn>(call),
                                reinterpret_cast<void *>(context)};
    // Under bf16 autocast the input arrives in bf16: statistics, normalisation and gradients are
    // computed in float32 (as autocast keeps batch norm), the output goes back in the input's type.
    const auto input_kind = x.scalar_type();
    if (is_reduced(input_kind)) x = x.to(at::kFloat);
    const int64_t c = x.size(1);
    const auto dims = reduced_dims(x);
    const auto float_options = x.options().dtype(at::kFloat);
    // This rank's mean and biased variance: libtorch's batch-norm statistics kernel on CPU (one
    // pass, faster there than a general reduction over dimensions 0, 2, 3), var_mean elsewhere.
    at::Tensor local_mean, local_var;
    if (x.is_cpu()) {
      std::tie(local_mean, local_var) = at::batch_norm_update_stats(x, {}, {}, 0.0);
    } else {
      std::tie(local_var, local_mean) = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/false);
    }
    auto local = at::cat({at::full({1}, static_cast<double>(x.numel() / c), float_options),
                          local_mean.to(at::kFloat), local_var.to(at::kFloat)})
                     .view({1, 1 + 2 * c});
    auto all = collective.run(0, local).to(at::kDouble);
    auto counts = all.narrow(1, 0, 1);
    auto count = counts.sum();
    auto means = all.narrow(1, 1, c);
    auto vars = all.narrow(1, 1 + c, c);
    auto mean = (means * counts).sum(0) / count;
    auto var = ((vars + (means - mean.unsqueeze(0)).square()) * counts).sum(0) / count;
    {
      // Unbiased over the global count; one value per channel has no spread (var = 0).
      auto unbiased = var * (count / (count.clamp_min(2.0) - 1.0));
      const auto kind = running_mean.scalar_type();
      running_mean.copy_(running_mean * (1.0 - momentum) + mean.to(kind) * momentum);
      running_var.copy_(running_var * (1.0 - momentum) + unbiased.to(kind) * momentum);
    }
    const auto kind = x.scalar_type();
    const auto shape = channel_shape(x);
    auto invstd = (var + eps).rsqrt().to(kind);
    // y = (x - mean) * (weight * invstd) + bias, with x - mean formed first: libtorch's
    // inference-mode kernel folds the mean into the bias (x * a + b), which cancels where a
    // channel's mean is far larger than its spread. The centred input is what the backward needs.
    auto centred = x - mean.to(kind).view(shape);
    auto scale = weight.defined() ? invstd * weight : invstd;
    auto y = bias.defined() ? at::addcmul(bias.view(shape).to(kind), centred, scale.view(shape).to(kind))
                            : centred * scale.view(shape).to(kind);
    if (is_reduced(input_kind)) y = y.to(input_kind);
    ctx->save_for_backward({centred, weight, invstd, count});
    ctx->saved_data["call"] = call;
    ctx->saved_data["context"] = context;
    ctx->saved_data["bias"] = bias.defined();
    return y;
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads) {
    const Collective collective{
        reinterpret_cast<simclr_collective_fn>(ctx->saved_data["call"].toInt()),
        reinterpret_cast<void *>(ctx->saved_data["context"].toInt())};
    auto saved = ctx->get_saved_variables();
    const auto &centred = saved[0];
    const auto &weight = saved[1];
    const auto &invstd = saved[2];
    const auto &count = saved[3];
    // The kernels below take (x, mean); (x - mean, 0) is the same input, better conditioned.
    const auto zero_mean = at::zeros_like(invstd);
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const auto grad_kind = grads[0].scalar_type();
    auto dy = grads[0].to(centred.scalar_type()).contiguous(centred.suggest_memory_format());
    const int64_t c = centred.size(1);
    const auto dims = reduced_dims(centred);
    const auto shape = channel_shape(centred);
    at::Tensor sum_dy, sum_dy_xmu, dweight, dbias;
    if (centred.is_cuda()) {
      auto r = at::batch_norm_backward_reduce(dy, centred, zero_mean, invstd, weight, true, false, false);
      sum_dy = std::get<0>(r);
      sum_dy_xmu = std::get<1>(r);
    } else if (weight.defined()) {
      // The training-mode backward's weight and bias gradients, without its input gradient, are
      // the two sums (times invstd) in one fused pass: sum(dy * (x - mean)) * invstd and sum(dy).
      auto r = at::native_batch_norm_backward(dy, centred, weight, {}, {}, zero_mean, invstd,
                                              /*train=*/true, 0.0, {false, true, true});
      dweight = std::get<1>(r);
      sum_dy = std::get<2>(r).to(at::kFloat);
      sum_dy_xmu = (dweight / invstd).to(at::kFloat);
    } else {
      sum_dy = dy.sum(dims, false, at::kFloat);
      sum_dy_xmu = (dy * centred).sum(dims, false, at::kFloat);
    }
    if (weight.defined() && !dweight.defined()) dweight = (sum_dy_xmu * invstd).to(weight.scalar_type());
    if (has_bias) dbias = sum_dy.to(weight.defined() ? weight.scalar_type() : dy.scalar_type());
    auto sums = collective.run(1, at::cat({sum_dy.to(at::kFloat), sum_dy_xmu.to(at::kFloat)}));
    auto total_dy = sums.narrow(0, 0, c);
    auto total_dy_xmu = sums.narrow(0, c, c);
    at::Tensor dx;
    if (centred.is_cuda()) {
      dx = at::batch_norm_backward_elemt(dy, centred, zero_mean, invstd, weight, total_dy, total_dy_xmu,
                                         count.to(at::kInt).view({1}));
    } else {
      // dx = dy * scale + (x - mean) * slope + offset, per channel.
      const auto kind = dy.scalar_type();
      auto scale = weight.defined() ? invstd * weight : invstd;
      auto slope = -(total_dy_xmu / count).to(invstd.scalar_type()) * invstd.square() * scale;
      auto offset = -(total_dy / count).to(invstd.scalar_type()) * scale;
      dx = at::addcmul(offset.view(shape).to(kind), dy, scale.view(shape).to(kind));
      dx.addcmul_(centred, slope.view(shape).to(kind));
    }
    if (is_reduced(grad_kind)) dx = dx.to(grad_kind);
    return {dx, dweight, dbias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

thread_local std::string last_error;

}  // namespace

extern "C" {

// y = SyncBatchNorm(x) with a gradient function; nullptr on failure (simclr_sync_batch_norm_error).
// weight and bias may be undefined tensors.
at::Tensor *simclr_sync_batch_norm(const at::Tensor *x, const at::Tensor *weight,
                                   const at::Tensor *bias, const at::Tensor *running_mean,
                                   const at::Tensor *running_var, double eps, double momentum,
                                   simclr_collective_fn call, void *context) {
  try {
    last_error.clear();
    auto y = SyncBatchNorm::apply(*x, *weight, *bias, *running_mean, *running_var, eps, momentum,
                                  reinterpret_cast<int64_t>(call), reinterpret_cast<int64_t>(context));
    return new at::Tensor(y);
  } catch (const std::exception &e) {
    last_error = e.what();
    return nullptr;
  }
}

// Backward of `output` with the incoming gradient `grad` (torch.autograd.backward(output, grad));
// 0 on success, 1 on failure (simclr_sync_batch_norm_error).
int simclr_backward_with_grad(const at::Tensor *output, const at::Tensor *grad) {
  try {
    last_error.clear();
    torch::autograd::backward({*output}, {*grad});
    return 0;
  } catch (const std::exception &e) {
    last_error = e.what();
    return 1;
  }
}

// The message of this thread's last failure.
const char *simclr_sync_batch_norm_error() { return last_error.c_str(); }
}
