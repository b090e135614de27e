// Hooks that run once a parameter's gradient for this backward has been accumulated (the autograd
// engine's post-accumulate-grad hooks, which tch does not expose): the trainer's overlapped gradient
// all-reduce starts a bucket as soon as its last gradient is there, while the backward goes on.
// worker/src/engine/overlap.rs has the Rust side.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <memory>

extern "C" {
// Called on the thread that runs the backward, with the index given at registration.
typedef void (*simclr_grad_ready_fn)(void *context, int64_t index);
}

namespace {

struct GradReady : torch::autograd::PostAccumulateGradHook {
  simclr_grad_ready_fn call;
  void *context;
  int64_t index;

  GradReady(simclr_grad_ready_fn call, void *context, int64_t index)
      : call(call), context(context), index(index) {}

  void operator()(const torch::autograd::Variable & /*tensor*/) override { call(context, index); }
};

} // namespace

extern "C" {

// Sets `t`'s post-accumulate-grad hook (replacing any other); 0 on success, 1 if `t` is not a leaf
// that requires a gradient.
int simclr_set_grad_ready_hook(const at::Tensor *t, simclr_grad_ready_fn call, void *context,
                               int64_t index) {
  try {
    if (!t->requires_grad() || !t->is_leaf()) return 1;
    torch::autograd::impl::set_post_acc_grad_hooks(*t, std::make_unique<GradReady>(call, context, index));
    return 0;
  } catch (...) {
    return 1;
  }
}

// Removes `t`'s post-accumulate-grad hook.
void simclr_clear_grad_ready_hook(const at::Tensor *t) {
  try {
    torch::autograd::impl::set_post_acc_grad_hooks(*t, nullptr);
  } catch (...) {
  }
}
}
