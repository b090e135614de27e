//! The worker of a simclr-cluster job: one per GPU (or per CPU process). Owns the peer endpoint, the
//! session with the coordinator (registration, heartbeats, phases, deregistration) and, as the later
//! stages land, everything that touches tensors: DICOM decode, augmentations, models, losses,
//! optimisers and collectives.

pub mod augment;
pub mod collective;
pub mod decode;
pub mod device;
pub mod error;
pub mod features;
pub mod loss;
pub mod model;
pub mod nccl;
pub mod optim;
pub mod peer;
pub mod preflight;
pub mod pretrain;
pub mod probe;
pub mod session;
pub mod sweep;
pub mod syncbn;
pub mod tcp;
pub mod train;

pub use device::Device;
pub use error::WorkerError;
pub use session::{run, Interrupt, WorkerOptions};
