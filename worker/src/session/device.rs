//! Device selection: `cpu` or `cuda:K`, checked against what libtorch sees. A worker never falls back
//! silently: asking for a GPU that is not there is an error naming the flag.

use crate::session::error::WorkerError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Parses the `--device` value without touching libtorch.
    pub fn parse(spec: &str) -> Result<Device, WorkerError> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(k)) => Ok(Device::Cuda(k)),
                _ => Err(WorkerError::Usage {
                    flag: "--device",
                    message: format!("'{spec}' is not a device (expected cpu or cuda:K, e.g. cuda:0)"),
                }),
            },
        }
    }

    /// How many GPUs libtorch sees (0 when its CUDA library does not load).
    pub fn cuda_count() -> usize {
        if load_torch_cuda().is_ok() {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        }
    }

    /// Checks the device exists and returns libtorch's handle for it.
    pub fn open(self) -> Result<tch::Device, WorkerError> {
        match self {
            Device::Cpu => Ok(tch::Device::Cpu),
            Device::Cuda(k) => {
                load_torch_cuda().map_err(|message| WorkerError::Device { device: self.to_string(), message })?;
                let count = tch::Cuda::device_count().max(0) as usize;
                if k < count {
                    // Allocate and compute once, so that a GPU in a bad state fails here, before the
                    // rendezvous, rather than in the middle of the job.
                    let device = tch::Device::Cuda(k);
                    let smoke = tch::Tensor::f_ones([16], (tch::Kind::Float, device))
                        .and_then(|t| t.f_sum(tch::Kind::Float))
                        .and_then(|t| t.f_double_value(&[]));
                    match smoke {
                        Ok(16.0) => Ok(device),
                        Ok(v) => Err(WorkerError::Device {
                            device: self.to_string(),
                            message: format!("smoke test computed {v} instead of 16"),
                        }),
                        Err(e) => Err(WorkerError::Device { device: self.to_string(), message: e.to_string() }),
                    }
                } else {
                    Err(WorkerError::Device {
                        device: self.to_string(),
                        message: format!("libtorch sees {count} CUDA device(s) on this host (--device)"),
                    })
                }
            }
        }
    }
}

/// Loads libtorch's CUDA backend. The linker drops libtorch_cuda from the binary (nothing references it
/// by symbol), so CUDA is registered only once the library is loaded; loading it on demand also keeps
/// CPU-only hosts free of the CUDA libraries it needs (cuBLAS, cuDNN, NCCL: `scripts/setup.sh --cuda`).
fn load_torch_cuda() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let name = c"libtorch_cuda.so";
            // SAFETY: dlopen with a valid C string; the handle is kept for the life of the process.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !handle.is_null() {
                return Ok(());
            }
            // SAFETY: dlerror returns a thread-local C string or null.
            let reason = unsafe {
                let e = libc::dlerror();
                if e.is_null() {
                    "unknown error".to_string()
                } else {
                    std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            };
            Err(format!(
                "cannot load libtorch's CUDA backend ({reason}); on GPU hosts run scripts/setup.sh --cuda, or point LIBTORCH at a CUDA build of libtorch 2.11"
            ))
        })
        .clone()
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(k) => write!(f, "cuda:{k}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_with_the_flag_name() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda", "cuda:x", ""] {
            let e = Device::parse(bad).unwrap_err();
            assert!(e.to_string().contains("--device"), "{e}");
        }
    }

    #[test]
    fn cpu_opens_and_a_missing_gpu_is_an_error() {
        assert_eq!(Device::Cpu.open().unwrap(), tch::Device::Cpu);
        let k = tch::Cuda::device_count() as usize;
        let e = Device::Cuda(k).open().unwrap_err();
        assert!(e.to_string().contains(&format!("cuda:{k}")), "{e}");
    }
}
