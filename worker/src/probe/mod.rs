//! Probes on a frozen encoder: the classifier trainer and fine-tuning ([`trainer`]), and what the probe
//! phase moves between ranks ([`features`]: the encoder broadcast with its checksum, the gathered
//! features).

pub mod features;
pub mod trainer;

pub use trainer::{
    embed, finetune_probe, run_task, train_probe, FineTune, FineTuneData, ProbeConfig, ProbeOptimizer, ProbeResult,
    SweepData, EMBED_BATCH,
};
