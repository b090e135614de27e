//! The worker of a simclr-cluster job: one per GPU (or per CPU process). Layers, each importing only
//! the ones below it:
//!
//! - [`session`]: the worker's life in a job (peer endpoint, registration, heartbeats, the phase loop).
//! - [`phase`]: what each phase does on this rank, and the [`phase::PhaseContext`] it runs with.
//! - [`probe`]: classifier probes on frozen features, fine-tuning, and the features' movement between
//!   ranks.
//! - [`engine`]: models, augmentations, the NT-Xent loss, synchronised BatchNorm, optimisers, the
//!   pretraining step and its checkpoints.
//! - [`comm`]: the collectives (the [`comm::Collective`] trait, ring plans, gRPC, TCP and NCCL).

pub mod comm;
pub mod engine;
pub mod phase;
pub mod probe;
pub mod session;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use session::device::Device;
pub use session::error::WorkerError;
pub use session::{run, Interrupt, WorkerOptions};
