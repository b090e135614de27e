//! Probes on a frozen encoder: the classifier trainer and fine-tuning ([`trainer`]), and what the probe
//! phase moves between ranks ([`features`]: the encoder broadcast with its checksum, the gathered
//! features).

pub mod features;
pub mod knn;
pub mod trainer;

pub use trainer::{
    class_metrics, embed, finetune_probe, run_task, train_probe, train_probe_validated, FineTune, FineTuneData,
    ProbeConfig, ProbeOptimizer, ProbeResult, Rows, SweepData, ValidationData, EMBED_BATCH,
};
