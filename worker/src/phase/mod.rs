//! The phases of a job on one worker, in the order the coordinator runs them: preflight (peers and
//! devices), decode (DICOM into the decode cache), pretrain (SimCLR) and probe (the classifier sweep on
//! the frozen encoder). Each takes a [`PhaseContext`] and returns a [`PhaseOutput`] or a [`PhaseError`].

pub(crate) mod assignments;
mod context;
pub mod decode;
pub mod monitor;
pub mod preflight;
pub mod pretrain;
pub mod probe;

pub use context::{PhaseContext, PhaseError, PhaseOutput};
