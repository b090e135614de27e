//! Everything that touches tensors in pretraining: the encoder and head ([`model`]), the views
//! ([`augment`]), NT-Xent ([`loss`]), synchronised BatchNorm ([`syncbn`]), optimisers and schedules
//! ([`optim`]), the step, the monitor and checkpoints ([`train`]), and the input read a few batches ahead
//! ([`stream`]). Uses the collectives through the [`crate::comm::Collective`] trait only.

pub mod augment;
pub mod loss;
pub mod model;
pub mod numerics;
pub mod optim;
pub mod overlap;
pub mod stream;
pub mod syncbn;
pub mod train;
