//! The DICOM data plane, pure Rust (no libtorch): the coordinator indexes, splits and shards with it,
//! workers decode with it, and `synth` writes the synthetic SIIM-format dataset with it.

pub mod cache;
pub mod dataset;
pub mod dicom_writer;
pub mod index;
pub mod labels;
pub mod phantom;
pub mod pixels;
pub mod synth;
