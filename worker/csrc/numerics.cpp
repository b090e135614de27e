// Numerics switches libtorch has and tch 0.24 does not expose: autocast on any device type with a
// chosen dtype (tch's `autocast` is CUDA-only, in float16), cuDNN's and cuBLAS's TF32 switches, and
// the channels-last memory format. worker/src/engine/numerics.rs is the Rust side.

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <stdexcept>

namespace {

at::DeviceType device_type(int cuda) { return cuda ? at::kCUDA : at::kCPU; }

}  // namespace

extern "C" {

// Enters an autocast region for the device type (cuda: 1, cpu: 0) in bfloat16; returns whether
// autocast was enabled before, for simclr_autocast_exit.
bool simclr_autocast_enter(int cuda) {
  const auto type = device_type(cuda);
  const bool before = at::autocast::is_autocast_enabled(type);
  at::autocast::set_autocast_enabled(type, true);
  at::autocast::set_autocast_dtype(type, at::kBFloat16);
  at::autocast::increment_nesting();
  return before;
}

// Leaves the region simclr_autocast_enter opened, as torch.autocast's __exit__ does: the cast
// cache is cleared when the outermost region ends.
void simclr_autocast_exit(int cuda, bool before) {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_type(cuda), before);
}

// TF32 for cuDNN convolutions and cuBLAS matrix products (libtorch allows it in cuDNN by default).
void simclr_set_tf32(bool allow) {
  at::globalContext().setAllowTF32CuDNN(allow);
  at::globalContext().setAllowTF32CuBLAS(allow);
}

// The tensor in channels-last layout (a copy unless it already is); nullptr for a tensor that is
// not 4-dimensional.
at::Tensor *simclr_channels_last(const at::Tensor *t) {
  if (t->dim() != 4) return nullptr;
  return new at::Tensor(t->contiguous(at::MemoryFormat::ChannelsLast));
}

// Whether the tensor is laid out channels-last.
bool simclr_is_channels_last(const at::Tensor *t) {
  return t->dim() == 4 && t->is_contiguous(at::MemoryFormat::ChannelsLast);
}
}
