//! The arithmetic of the encoder and the projection head: `pretrain.precision` (fp32, tf32, bf16
//! autocast) and `pretrain.channels_last`, with the switches libtorch has and tch does not expose
//! (`worker/csrc/numerics.cpp`). The loss, the master weights and the optimizer state stay float32:
//! autocast computes convolutions and matrix products in bf16 from float32 weights, and the encoder's
//! and head's outputs are float32 again before the loss sees them.

use std::ffi::c_int;

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

pub use simclr_common::pretrain::Precision;

extern "C" {
    fn simclr_autocast_enter(cuda: c_int) -> bool;
    fn simclr_autocast_exit(cuda: c_int, before: bool);
    fn simclr_set_tf32(allow: bool);
    fn simclr_channels_last(t: *const C_tensor) -> *mut C_tensor;
    fn simclr_is_channels_last(t: *const C_tensor) -> bool;
}

/// The resolved settings for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numerics {
    /// fp32, tf32 or bf16 (never auto).
    pub precision: Precision,
    pub channels_last: bool,
    pub device: Device,
}

impl Numerics {
    /// `precision` auto: bf16 on CUDA, fp32 on the CPU; `channels_last` unset: on for CUDA only.
    pub fn new(precision: Precision, channels_last: Option<bool>, device: Device) -> Numerics {
        let cuda = device.is_cuda();
        Numerics { precision: precision.resolve(cuda), channels_last: channels_last.unwrap_or(cuda), device }
    }

    /// Sets libtorch's process-wide TF32 switches for this precision on CUDA: off for fp32 (libtorch
    /// allows TF32 in cuDNN convolutions by default), on for tf32 and bf16 (bf16 autocast leaves
    /// a few float32 products, which may as well use the tensor cores). Nothing on the CPU.
    pub fn apply_process_settings(&self) {
        if self.device.is_cuda() {
            unsafe { simclr_set_tf32(self.precision != Precision::Fp32) };
        }
    }

    /// Runs `f` (a forward pass) under bf16 autocast when the precision is bf16, else as it is.
    pub fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.precision != Precision::Bf16 {
            return f();
        }
        let cuda = c_int::from(self.device.is_cuda());
        let before = unsafe { simclr_autocast_enter(cuda) };
        struct Exit(c_int, bool);
        impl Drop for Exit {
            fn drop(&mut self) {
                unsafe { simclr_autocast_exit(self.0, self.1) };
            }
        }
        let _exit = Exit(cuda, before);
        f()
    }

    /// The encoder's input in the layout the settings ask for.
    pub fn layout(&self, x: &Tensor) -> Tensor {
        if self.channels_last && x.dim() == 4 {
            channels_last(x)
        } else {
            x.shallow_clone()
        }
    }
}

/// The float32 version of a forward pass's output (a no-op for float32).
pub fn to_float(t: Tensor) -> Tensor {
    if t.kind() == Kind::Float {
        t
    } else {
        t.to_kind(Kind::Float)
    }
}

/// `t` (4-dimensional) in channels-last layout.
pub fn channels_last(t: &Tensor) -> Tensor {
    let ptr = unsafe { simclr_channels_last(t.as_ptr()) };
    assert!(!ptr.is_null(), "channels_last needs a 4-dimensional tensor, not {:?}", t.size());
    unsafe { Tensor::from_ptr(ptr) }
}

pub fn is_channels_last(t: &Tensor) -> bool {
    unsafe { simclr_is_channels_last(t.as_ptr()) }
}
