//! The GPU backend of the collectives: NCCL, through cudarc's bindings, loaded at run time so that the
//! worker builds and runs on hosts without CUDA. cudarc panics when a library it needs is absent, so
//! every entry point here goes through [`loaded_version`] first and turns absence into an error that says what
//! to install.
//!
//! Collectives run on the device's legacy default stream, the stream libtorch computes on, so they are
//! ordered after the kernels that produced their inputs. Each call then polls the stream until the
//! collective has finished; past `cluster.collective_timeout_ms`, or when NCCL reports an asynchronous
//! error (a peer died), the communicator is aborted and the call fails, so a dead or stalled peer is an
//! error on every other rank, never a hang. After an abort every later call fails at once.
//!
//! Rank 0 creates the NCCL unique id and the coordinator hands it to the others (`ShareValue`).

use std::ffi::CStr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::nccl::sys;
use tch::{Kind, Tensor};

use crate::comm::{Collective, CollectiveError};

/// NCCL's version (e.g. 22809 for 2.28.9) once the library and the CUDA driver are known to load.
pub fn loaded_version() -> Result<i32, String> {
    static LOADED: OnceLock<Result<i32, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: only tries to load a library by name.
            if !unsafe { sys::is_culib_present() } {
                return Err(missing_nccl());
            }
            let mut version = 0;
            // SAFETY: NCCL writes one int.
            check(unsafe { sys::ncclGetVersion(&mut version) }, "ncclGetVersion")?;
            // SAFETY: only tries to load a library by name.
            if !unsafe { cu::is_culib_present() } {
                return Err(format!(
                    "NCCL {} loaded, but the CUDA driver (libcuda.so) is not on this host: NCCL needs a GPU \
                     host (use --collective grpc on CPU hosts)",
                    version_string(version)
                ));
            }
            Ok(version)
        })
        .clone()
}

/// Why NCCL did not load, and what to do about it. PyTorch's wheels ship NCCL as `libnccl.so.2` only,
/// while cudarc loads `libnccl.so`.
fn missing_nccl() -> String {
    // SAFETY: dlopen with a valid C string; the handle is kept (harmless).
    let versioned = unsafe { !libc::dlopen(c"libnccl.so.2".as_ptr(), libc::RTLD_LAZY).is_null() };
    if versioned {
        "NCCL is installed only as libnccl.so.2, but cudarc loads libnccl.so: run scripts/setup.sh --cuda \
         (links it beside PyTorch's copy), or put a directory holding a libnccl.so link on LD_LIBRARY_PATH"
            .to_string()
    } else {
        "NCCL (libnccl.so) is not installed on this host: scripts/setup.sh --cuda installs PyTorch's copy, \
         or install NVIDIA's libnccl2 and libnccl-dev; or choose --collective grpc"
            .to_string()
    }
}

/// 22809 -> "2.28.9" (NCCL_VERSION_CODE since 2.9: major * 10000 + minor * 100 + patch).
pub fn version_string(code: i32) -> String {
    format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
}

fn check(result: sys::ncclResult_t, what: &str) -> Result<(), String> {
    match result {
        sys::ncclResult_t::ncclSuccess => Ok(()),
        other => Err(format!("{what}: {}", error_string(other))),
    }
}

fn error_string(result: sys::ncclResult_t) -> String {
    // SAFETY: NCCL returns a static C string for every result code.
    let text = unsafe { sys::ncclGetErrorString(result) };
    if text.is_null() {
        format!("{result:?}")
    } else {
        // SAFETY: non-null, NUL-terminated, static.
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    }
}

/// The communicator handle; NCCL calls on one communicator must not overlap, so it lives in a mutex.
struct Comm(sys::ncclComm_t);
// SAFETY: the handle is only used under the mutex, one call at a time, from any thread that has made
// the device's context current first.
unsafe impl Send for Comm {}

pub struct NcclCollective {
    rank: usize,
    world: usize,
    device: i64,
    context: Context,
    timeout: Duration,
    comm: Mutex<Option<Comm>>,
}

/// The device's primary context (the one libtorch uses), made current on whichever thread calls.
#[derive(Clone, Copy)]
struct Context(cu::CUcontext);
// SAFETY: a CUDA context handle may be made current on any thread.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    fn open(ordinal: i64) -> Result<Context, String> {
        let e = |what: &str, err: cudarc::driver::DriverError| format!("{what} (cuda:{ordinal}): {err:?}");
        cudarc::driver::result::init().map_err(|err| e("cuInit", err))?;
        let dev = cudarc::driver::result::device::get(ordinal as i32).map_err(|err| e("cuDeviceGet", err))?;
        // SAFETY: retains the primary context of a valid device; it stays retained for the process.
        let ctx = unsafe { cudarc::driver::result::primary_ctx::retain(dev) }
            .map_err(|err| e("cuDevicePrimaryCtxRetain", err))?;
        Ok(Context(ctx))
    }

    fn make_current(self) -> Result<(), String> {
        // SAFETY: a retained primary context.
        unsafe { cudarc::driver::result::ctx::set_current(self.0) }.map_err(|e| format!("cuCtxSetCurrent: {e:?}"))
    }
}

impl NcclCollective {
    /// Joins the job's NCCL communicator on `cuda:device`. `share` publishes rank 0's unique id through
    /// the coordinator (rank 0 passes Some, the others None) and returns it. Initialisation is bounded
    /// by `timeout` too: a rank that never joins makes it fail instead of hang.
    pub fn connect(
        rank: usize,
        world: usize,
        device: i64,
        timeout: Duration,
        share: impl FnOnce(Option<Vec<u8>>) -> Result<Vec<u8>, String>,
    ) -> Result<NcclCollective, CollectiveError> {
        let invalid = |message: String| CollectiveError::Invalid { op: "nccl init", message };
        let version = loaded_version().map_err(invalid)?;
        let context = Context::open(device).map_err(invalid)?;
        let id = if rank == 0 {
            let mut id = sys::ncclUniqueId { internal: [0; 128] };
            // SAFETY: NCCL fills the 128-byte id.
            check(unsafe { sys::ncclGetUniqueId(&mut id) }, "ncclGetUniqueId").map_err(invalid)?;
            share(Some(id.internal.iter().map(|&c| c as u8).collect())).map_err(invalid)?;
            id
        } else {
            let bytes = share(None).map_err(invalid)?;
            if bytes.len() != 128 {
                return Err(invalid(format!("rank 0's NCCL unique id has {} bytes, expected 128", bytes.len())));
            }
            let mut id = sys::ncclUniqueId { internal: [0; 128] };
            for (dst, src) in id.internal.iter_mut().zip(&bytes) {
                *dst = *src as std::ffi::c_char;
            }
            id
        };
        // ncclCommInitRank blocks until every rank has joined; it runs on its own thread so that a rank
        // that never comes is a timeout here.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("nccl-init".into())
            .spawn(move || {
                let result = context.make_current().map_err(invalid).and_then(|()| {
                    let mut comm: sys::ncclComm_t = std::ptr::null_mut();
                    // SAFETY: NCCL writes the communicator handle.
                    let code = unsafe { sys::ncclCommInitRank(&mut comm, world as i32, id, rank as i32) };
                    check(code, "ncclCommInitRank").map(|()| Comm(comm)).map_err(|message| {
                        // NCCL's verdict on the set-up itself (two ranks on one GPU, a bad argument):
                        // the same processes would get the same answer again.
                        if matches!(code, sys::ncclResult_t::ncclInvalidUsage | sys::ncclResult_t::ncclInvalidArgument)
                        {
                            CollectiveError::Unusable { op: "nccl init", message }
                        } else {
                            invalid(message)
                        }
                    })
                });
                let _ = tx.send(result);
            })
            .map_err(|e| invalid(format!("cannot start the NCCL init thread: {e}")))?;
        let comm = match rx.recv_timeout(timeout) {
            Ok(result) => result?,
            Err(_) => {
                return Err(CollectiveError::Invalid {
                    op: "nccl init",
                    message: format!(
                        "not every rank joined the NCCL communicator within {} ms (cluster.collective_timeout_ms)",
                        timeout.as_millis()
                    ),
                })
            }
        };
        tracing::info!(rank, world, device = %format!("cuda:{device}"), nccl = %version_string(version), "NCCL communicator ready");
        Ok(NcclCollective { rank, world, device, context, timeout, comm: Mutex::new(Some(comm)) })
    }

    /// Runs one NCCL call on the default stream and waits for it within the timeout; on a timeout or an
    /// asynchronous error the communicator is aborted.
    fn run(
        &self,
        op: &'static str,
        launch: impl FnOnce(sys::ncclComm_t) -> sys::ncclResult_t,
    ) -> Result<(), CollectiveError> {
        let invalid = |message: String| CollectiveError::Invalid { op, message };
        let mut guard = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let comm = match guard.as_ref() {
            Some(c) => c.0,
            None => return Err(invalid("the NCCL communicator was aborted after an earlier failure".into())),
        };
        self.context.make_current().map_err(invalid)?;
        check(launch(comm), op).map_err(invalid)?;
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            // SAFETY: queries the current context's legacy default stream.
            match unsafe { cu::cuStreamQuery(std::ptr::null_mut()) } {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    return Err(invalid(format!("the device failed during the collective: {other:?}")));
                }
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator; NCCL writes one result.
            unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
            let failed = !matches!(state, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress);
            if failed || started.elapsed() > self.timeout {
                // SAFETY: aborting a live communicator; it is never used again.
                unsafe { sys::ncclCommAbort(comm) };
                *guard = None;
                return Err(if failed {
                    invalid(format!("NCCL reported {} (a peer failed?); communicator aborted", error_string(state)))
                } else {
                    CollectiveError::Timeout {
                        op,
                        peer: (self.rank + self.world - 1) % self.world,
                        addr: "nccl".into(),
                        timeout_ms: self.timeout.as_millis() as u64,
                    }
                });
            }
            spins += 1;
            if spins < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// `t` as a contiguous float32 tensor on this rank's GPU.
    fn on_device(&self, t: &Tensor, op: &'static str) -> Result<Tensor, CollectiveError> {
        if t.kind() != Kind::Float {
            return Err(CollectiveError::Invalid { op, message: format!("expected float32, got {:?}", t.kind()) });
        }
        Ok(t.detach().to_device(tch::Device::Cuda(self.device as usize)).contiguous())
    }
}

/// A float32 tensor's device memory, as NCCL takes it.
fn ptr(t: &Tensor) -> *mut std::ffi::c_void {
    t.data_ptr()
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        const OP: &str = "all-reduce";
        let buf = self.on_device(t, OP)?.copy();
        let n = buf.numel();
        // SAFETY: in place on a contiguous float32 buffer of n elements, on the communicator's device.
        self.run(OP, |comm| unsafe {
            sys::ncclAllReduce(
                ptr(&buf),
                ptr(&buf),
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                comm,
                std::ptr::null_mut(),
            )
        })?;
        Ok(buf.to_device(t.device()))
    }

    fn all_reduce_sum_in_place(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let on_device = t.device() == tch::Device::Cuda(self.device as usize);
        if !on_device || t.kind() != Kind::Float || !t.is_contiguous() {
            let sum = self.all_reduce_sum(t)?;
            t.copy_(&sum);
            return Ok(());
        }
        let n = t.numel();
        // SAFETY: in place on the caller's contiguous float32 tensor on the communicator's device.
        self.run("all-reduce", |comm| unsafe {
            sys::ncclAllReduce(
                ptr(t),
                ptr(t),
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                comm,
                std::ptr::null_mut(),
            )
        })
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        const OP: &str = "all-gather";
        let input = self.on_device(t, OP)?;
        let mut shape = input.size();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] *= self.world as i64;
        let out = Tensor::empty(shape.as_slice(), (Kind::Float, input.device()));
        let n = input.numel();
        // SAFETY: n floats in, world x n floats out, both contiguous on the communicator's device.
        self.run(OP, |comm| unsafe {
            sys::ncclAllGather(ptr(&input), ptr(&out), n, sys::ncclDataType_t::ncclFloat32, comm, std::ptr::null_mut())
        })?;
        Ok(out.to_device(t.device()))
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        const OP: &str = "reduce-scatter";
        let input = self.on_device(t, OP)?;
        let mut shape = input.size();
        let w = self.world as i64;
        if shape.is_empty() || shape[0] % w != 0 {
            return Err(CollectiveError::Invalid {
                op: OP,
                message: format!("dimension 0 of {shape:?} does not split into {w} equal blocks"),
            });
        }
        shape[0] /= w;
        let out = Tensor::empty(shape.as_slice(), (Kind::Float, input.device()));
        let n = out.numel();
        // SAFETY: world x n floats in, n floats out, both contiguous on the communicator's device.
        self.run(OP, |comm| unsafe {
            sys::ncclReduceScatter(
                ptr(&input),
                ptr(&out),
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                comm,
                std::ptr::null_mut(),
            )
        })?;
        Ok(out.to_device(t.device()))
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CollectiveError> {
        const OP: &str = "broadcast";
        if root >= self.world {
            return Err(CollectiveError::Invalid { op: OP, message: format!("root {root} is not a rank") });
        }
        let buf = self.on_device(t, OP)?.copy();
        let n = buf.numel();
        // SAFETY: in place on a contiguous float32 buffer of n elements on the communicator's device.
        self.run(OP, |comm| unsafe {
            sys::ncclBroadcast(
                ptr(&buf),
                ptr(&buf),
                n,
                sys::ncclDataType_t::ncclFloat32,
                root as i32,
                comm,
                std::ptr::null_mut(),
            )
        })?;
        Ok(buf.to_device(t.device()))
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        let one = Tensor::ones([1], (Kind::Float, tch::Device::Cuda(self.device as usize)));
        self.all_reduce_sum(&one).map(|_| ())
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if let Some(comm) = self.comm.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            if self.context.make_current().is_ok() {
                // SAFETY: no call is in flight (we hold the only reference); the handle is not used again.
                unsafe { sys::ncclCommDestroy(comm.0) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On hosts without CUDA (CI) loading NCCL is an error that says what to do, never a panic; on a GPU
    /// host with NCCL it reports a 2.x version. With scripts/setup.sh --python (the test set-up) the
    /// wheel's NCCL is linked and loads through cudarc here too, so only the driver is missing.
    #[test]
    fn loading_nccl_explains_its_absence_or_reports_a_version() {
        match loaded_version() {
            Ok(version) => assert!(version >= 20000, "NCCL version {version}"),
            Err(message) => {
                assert!(message.contains("libcuda") || message.contains("libnccl"), "{message}");
                assert!(message.contains("--collective grpc") || message.contains("setup.sh --cuda"), "{message}");
                if std::env::var_os("SIMCLR_EXPECT_NCCL").is_some() {
                    assert!(message.starts_with("NCCL 2."), "NCCL did not load: {message}");
                }
            }
        }
    }

    #[test]
    fn version_codes_read_as_releases() {
        assert_eq!(version_string(22809), "2.28.9");
        assert_eq!(version_string(21903), "2.19.3");
    }
}
