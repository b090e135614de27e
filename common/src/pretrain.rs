//! The `[pretrain]` section: the SimCLR model, its augmentations, loss and optimiser. Pure data, so the
//! coordinator (which never links libtorch) validates it and the workers read the same types.
//!
//! `batch_size` is the global batch: every optimiser step sees `batch_size` images (2 x `batch_size`
//! views) spread over the ranks, `batch_size / world_size` on each, and the learning rate scales with it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{invalid, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Resnet18,
    Resnet34,
    Resnet50,
    /// Bottlenecks, [3, 4, 23, 3] blocks (SimCLR v2's ResNet-101).
    Resnet101,
    /// Bottlenecks, [3, 8, 36, 3] blocks (SimCLR v2's ResNet-152).
    Resnet152,
    /// BasicBlocks, one per stage, 2 base channels: a few thousand parameters, for tests.
    Tiny,
    /// Bottlenecks, one per stage, 2 base channels: the smallest net with every part of a ResNet-50
    /// (and of SimCLR v2's selective-kernel ResNet), for tests.
    #[serde(rename = "tiny_bottleneck")]
    TinyBottleneck,
}

impl Arch {
    /// Bottleneck blocks (ResNet-50/101/152), not BasicBlocks.
    pub fn bottleneck(self) -> bool {
        matches!(self, Arch::Resnet50 | Arch::Resnet101 | Arch::Resnet152 | Arch::TinyBottleneck)
    }
}

/// Which ResNet family's layout the encoder follows (the same weights in another layout give other
/// features, so an imported encoder records its own and the job must match it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// torchvision's ResNet: max pool padded by one on every side.
    #[default]
    Torchvision,
    /// google-research/simclr's TensorFlow ResNet (SimCLR v1, and v2 without selective kernels):
    /// torchvision's layers, with the stem's max pool padded as TensorFlow's `SAME` (bottom and right).
    SimclrTf,
    /// SimCLR v2's selective-kernel ResNet (`sk_ratio = 0.0625`, bottleneck nets only): a three-layer
    /// 3x3 stem, selective-kernel 3x3 convolutions, ResNet-D shortcuts (2x2 average pooling before
    /// a stride-1 projection), TensorFlow's padding.
    SimclrTfSk,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Torchvision => "torchvision",
            Variant::SimclrTf => "simclr_tf",
            Variant::SimclrTfSk => "simclr_tf_sk",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// The grayscale channel repeated three times into torchvision's stem (ImageNet-format weights load).
    Repeat3,
    /// A 1-channel stem (a third of the stem's weights; torchvision weights do not load into it).
    Native1,
}

/// Where a sample's two views come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positives {
    /// Both from the same image (SimCLR).
    #[default]
    Views,
    /// The second from another training image of the same study, where it has one (MedAug, Vu et al.
    /// 2021); the same image otherwise.
    SameStudy,
    /// The second from another training image of the same patient (any of their studies; a study
    /// without a PatientID counts as its own patient), where there is one.
    SamePatient,
}

/// How pixels in [0, 1] are scaled before the encoder's first convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputNormalisation {
    /// As they are (this project's encoders; SimCLR's TensorFlow models).
    #[default]
    None,
    /// Per channel, (x - mean) / std with ImageNet's statistics (torchvision's, timm's, solo-learn's and
    /// lightly's encoders were trained so); the grayscale image is repeated to 3 channels first.
    Imagenet,
}

impl InputNormalisation {
    pub fn name(self) -> &'static str {
        match self {
            InputNormalisation::None => "none",
            InputNormalisation::Imagenet => "imagenet",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    Lars,
    Sgd,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScalingName {
    Linear,
    Sqrt,
    None,
}

/// BatchNorm statistics during pretraining with more than one worker.
/// The arithmetic of the encoder and the projection head (`pretrain.precision`); the loss, the master
/// weights and the optimizer state are float32 in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on CUDA, fp32 on the CPU.
    #[default]
    Auto,
    /// float32 throughout (on CUDA with TF32 switched off for cuDNN and cuBLAS).
    Fp32,
    /// float32 tensors, TF32 tensor-core products on CUDA (the CPU computes fp32).
    Tf32,
    /// bfloat16 autocast for the encoder and the head (convolutions and products in bf16).
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// What `auto` means on a device: bf16 on CUDA, fp32 elsewhere.
    pub fn resolve(self, cuda: bool) -> Precision {
        match self {
            Precision::Auto if cuda => Precision::Bf16,
            Precision::Auto => Precision::Fp32,
            p => p,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Precision::Auto),
            "fp32" => Ok(Precision::Fp32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("'{s}' is not a precision (expected auto, fp32, tf32 or bf16)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BnMode {
    /// Statistics over the global batch (SimCLR's global BN): world-size invariant.
    Sync,
    /// Each worker's own statistics (faster; a view can find its partner through them).
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AugmentPreset {
    Simclr,
    Cxr,
}

/// SimCLR's augmentations for grayscale radiographs. In TOML, `preset` picks the defaults of every
/// other key and any key given overrides its preset value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "AugmentToml", into = "AugmentToml")]
pub struct AugmentConfig {
    pub preset: AugmentPreset,
    /// False: every view is the plain resized image (a debugging switch, to compare one step with an
    /// outside reference).
    pub enabled: bool,
    /// Crop area as a fraction of the image.
    pub crop_scale: (f64, f64),
    /// Crop aspect ratio (width / height), sampled log-uniformly.
    pub crop_ratio: (f64, f64),
    pub flip_p: f64,
    /// Colour-jitter strength s: brightness and contrast factors in [1 - 0.8 s, 1 + 0.8 s].
    pub jitter_strength: f64,
    pub jitter_p: f64,
    /// Gamma exponent range, applied with probability `gamma_p`.
    pub gamma: (f64, f64),
    pub gamma_p: f64,
    pub blur_p: f64,
    pub blur_sigma: (f64, f64),
    /// Rotation in degrees, uniform in [-max, max].
    pub rotation_degrees: f64,
}

impl AugmentConfig {
    /// SimCLR's recipe (Chen et al. 2020, appendix A) without the colour-only parts.
    pub fn simclr() -> AugmentConfig {
        AugmentConfig {
            preset: AugmentPreset::Simclr,
            enabled: true,
            crop_scale: (0.08, 1.0),
            crop_ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            jitter_strength: 1.0,
            jitter_p: 0.8,
            gamma: (1.0, 1.0),
            gamma_p: 0.0,
            blur_p: 0.5,
            blur_sigma: (0.1, 2.0),
            rotation_degrees: 0.0,
        }
    }

    /// Chest radiographs: gentler crops (a lung field, not a rib), milder jitter, gamma for exposure,
    /// and small rotations (about +-10 degrees, as chest-radiograph contrastive work uses).
    pub fn cxr() -> AugmentConfig {
        AugmentConfig {
            preset: AugmentPreset::Cxr,
            crop_scale: (0.3, 1.0),
            jitter_strength: 0.5,
            gamma: (0.7, 1.4),
            gamma_p: 0.5,
            rotation_degrees: 10.0,
            ..AugmentConfig::simclr()
        }
    }

    pub fn preset(preset: AugmentPreset) -> AugmentConfig {
        match preset {
            AugmentPreset::Simclr => AugmentConfig::simclr(),
            AugmentPreset::Cxr => AugmentConfig::cxr(),
        }
    }

    pub fn disabled() -> AugmentConfig {
        AugmentConfig { enabled: false, ..AugmentConfig::simclr() }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let probability = |key: &'static str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(invalid(key, p, "expected a probability in [0, 1]".into()))
            }
        };
        probability("pretrain.augment.flip_p", self.flip_p)?;
        probability("pretrain.augment.jitter_p", self.jitter_p)?;
        probability("pretrain.augment.gamma_p", self.gamma_p)?;
        probability("pretrain.augment.blur_p", self.blur_p)?;
        let range = |key: &'static str, (lo, hi): (f64, f64), min: f64, max: f64| {
            if lo.is_finite() && hi.is_finite() && min <= lo && lo <= hi && hi <= max {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    format!("[{lo}, {hi}]"),
                    format!("expected [low, high] with {min} <= low <= high <= {max}"),
                ))
            }
        };
        range("pretrain.augment.crop_scale", self.crop_scale, 1e-3, 1.0)?;
        range("pretrain.augment.crop_ratio", self.crop_ratio, 0.1, 10.0)?;
        range("pretrain.augment.gamma", self.gamma, 0.1, 10.0)?;
        range("pretrain.augment.blur_sigma", self.blur_sigma, 1e-3, 50.0)?;
        if !(0.0..=1.0).contains(&self.jitter_strength) {
            return Err(invalid("pretrain.augment.jitter_strength", self.jitter_strength, "expected 0..=1".into()));
        }
        if !(0.0..=180.0).contains(&self.rotation_degrees) {
            return Err(invalid("pretrain.augment.rotation_degrees", self.rotation_degrees, "expected 0..=180".into()));
        }
        Ok(())
    }
}

/// The TOML form: a preset and optional overrides.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AugmentToml {
    #[serde(default = "default_preset")]
    preset: AugmentPreset,
    enabled: Option<bool>,
    crop_scale: Option<(f64, f64)>,
    crop_ratio: Option<(f64, f64)>,
    flip_p: Option<f64>,
    jitter_strength: Option<f64>,
    jitter_p: Option<f64>,
    gamma: Option<(f64, f64)>,
    gamma_p: Option<f64>,
    blur_p: Option<f64>,
    blur_sigma: Option<(f64, f64)>,
    rotation_degrees: Option<f64>,
}

fn default_preset() -> AugmentPreset {
    AugmentPreset::Cxr
}

impl TryFrom<AugmentToml> for AugmentConfig {
    type Error = String;
    fn try_from(t: AugmentToml) -> Result<AugmentConfig, String> {
        let p = AugmentConfig::preset(t.preset);
        Ok(AugmentConfig {
            preset: t.preset,
            enabled: t.enabled.unwrap_or(p.enabled),
            crop_scale: t.crop_scale.unwrap_or(p.crop_scale),
            crop_ratio: t.crop_ratio.unwrap_or(p.crop_ratio),
            flip_p: t.flip_p.unwrap_or(p.flip_p),
            jitter_strength: t.jitter_strength.unwrap_or(p.jitter_strength),
            jitter_p: t.jitter_p.unwrap_or(p.jitter_p),
            gamma: t.gamma.unwrap_or(p.gamma),
            gamma_p: t.gamma_p.unwrap_or(p.gamma_p),
            blur_p: t.blur_p.unwrap_or(p.blur_p),
            blur_sigma: t.blur_sigma.unwrap_or(p.blur_sigma),
            rotation_degrees: t.rotation_degrees.unwrap_or(p.rotation_degrees),
        })
    }
}

impl From<AugmentConfig> for AugmentToml {
    fn from(c: AugmentConfig) -> AugmentToml {
        AugmentToml {
            preset: c.preset,
            enabled: Some(c.enabled),
            crop_scale: Some(c.crop_scale),
            crop_ratio: Some(c.crop_ratio),
            flip_p: Some(c.flip_p),
            jitter_strength: Some(c.jitter_strength),
            jitter_p: Some(c.jitter_p),
            gamma: Some(c.gamma),
            gamma_p: Some(c.gamma_p),
            blur_p: Some(c.blur_p),
            blur_sigma: Some(c.blur_sigma),
            rotation_degrees: Some(c.rotation_degrees),
        }
    }
}

/// `[pretrain.monitor]`: a weighted k-nearest-neighbour classifier (cosine similarity, votes weighted
/// by exp(similarity / temperature), as InstDisc and solo-learn) on the encoder's frozen features of the
/// validation images against the labelled training images, every few epochs and at the end. Its AUC
/// and accuracy for the first target go to the progress line, TensorBoard, `pretrain.json`,
/// `monitor.csv` and `plots/monitor.png`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Every this many epochs (and after the last); 0: off. Each look costs about a sixth of an epoch
    /// (one forward pass over the labelled images, against two views forward and backward).
    pub every_epochs: u64,
    pub knn_k: usize,
    pub knn_temperature: f64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig { every_epochs: 5, knn_k: 20, knn_temperature: 0.07 }
    }
}

impl MonitorConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.knn_k == 0 {
            return Err(invalid("pretrain.monitor.knn_k", self.knn_k, "expected at least 1".into()));
        }
        if !(self.knn_temperature > 0.0 && self.knn_temperature.is_finite()) {
            return Err(invalid("pretrain.monitor.knn_temperature", self.knn_temperature, "expected > 0".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainSection {
    /// False: no pretraining; the encoder comes from `init_weights` (or stays randomly initialised).
    pub enabled: bool,
    pub arch: Arch,
    /// 1 to 4, as SimCLR's ResNet-50 (1x), (2x), (4x) and SimCLR v2's (3x).
    pub width: i64,
    pub stem: Stem,
    /// The ResNet's layout: "torchvision", "simclr_tf" or "simclr_tf_sk" (google-research/simclr's
    /// TensorFlow encoders, without and with selective kernels).
    pub variant: Variant,
    /// Input scaling the encoder expects: "none" or "imagenet". An encoder file records its own
    /// (`import-weights` writes it) and loading one with another is refused.
    pub input_normalisation: InputNormalisation,
    /// torchvision-format encoder weights (safetensors) to start from; the projection head starts fresh.
    pub init_weights: Option<PathBuf>,
    pub head_layers: usize,
    /// Hidden width of the head; 0: the encoder's feature width (as SimCLR).
    pub head_hidden: i64,
    pub head_out: i64,
    pub head_batch_norm: bool,
    /// Images per optimiser step over all workers (two views each); a multiple of the world size.
    pub batch_size: usize,
    pub epochs: u64,
    /// Stop after this many steps in all (a debugging limit); 0: no limit.
    pub max_steps: u64,
    pub temperature: f64,
    pub optimizer: OptimizerName,
    pub base_lr: f64,
    pub lr_scaling: LrScalingName,
    pub weight_decay: f64,
    pub momentum: f64,
    pub warmup_epochs: f64,
    /// Side of the model input; the cached images are resampled to it by the crop.
    pub input_size: i64,
    pub augment: AugmentConfig,
    /// Where the two views of a sample come from: "views", "same_study" or "same_patient".
    pub positives: Positives,
    /// Representation quality watched while pretraining (needs labelled images).
    pub monitor: MonitorConfig,
    /// BatchNorm statistics with more than one worker.
    pub bn: BnMode,
    /// With `bn = "sync"`: ranks per BatchNorm group (consecutive ranks; 0, or the world size or more:
    /// all of them). Statistics are synchronised within each group only, as SwAV's groups of 8 GPUs;
    /// a smaller value must divide the world size.
    pub bn_group_size: usize,
    /// Arithmetic of the encoder and head, in pretraining and in the probe phase's feature pass.
    pub precision: Precision,
    /// The encoder's activations and convolution weights in channels-last layout; unset: on for
    /// CUDA, off for the CPU.
    pub channels_last: Option<bool>,
    /// Steps between checkpoints (0: only at the end).
    pub checkpoint_every: u64,
    /// On CUDA, steps between read-backs of the loss and contrastive accuracy (the host waits for the
    /// device only then; progress reports and the NaN check see the steps in between at that point).
    /// The CPU reads every step, which costs nothing there.
    pub log_every_steps: u64,
    /// With more than one worker: megabytes of gradients per all-reduce bucket, started while the
    /// backward still runs; 0: one all-reduce of every gradient after the backward.
    pub bucket_mb: f64,
    /// Keys (`pretrain.temperature`, `data.split_seed`, ...) that may differ from the checkpoint's
    /// when a run resumes (`--allow-config-change`); any other difference refuses the checkpoint.
    pub allow_config_change: Vec<String>,
    /// Seed of the weights, the epoch order and the augmentations: always `job.seed`.
    #[serde(skip)]
    pub seed: u64,
}

impl Default for PretrainSection {
    fn default() -> Self {
        PretrainSection {
            enabled: true,
            arch: Arch::Resnet50,
            width: 1,
            stem: Stem::Repeat3,
            variant: Variant::Torchvision,
            input_normalisation: InputNormalisation::None,
            init_weights: None,
            head_layers: 2,
            head_hidden: 0,
            head_out: 128,
            head_batch_norm: false,
            batch_size: 256,
            epochs: 100,
            max_steps: 0,
            temperature: 0.1,
            optimizer: OptimizerName::Lars,
            base_lr: 0.3,
            lr_scaling: LrScalingName::Linear,
            weight_decay: 1e-6,
            momentum: 0.9,
            warmup_epochs: 10.0,
            input_size: 224,
            augment: AugmentConfig::cxr(),
            positives: Positives::Views,
            monitor: MonitorConfig::default(),
            bn: BnMode::Sync,
            bn_group_size: 0,
            precision: Precision::Auto,
            channels_last: None,
            checkpoint_every: 0,
            log_every_steps: 10,
            bucket_mb: 25.0,
            allow_config_change: Vec::new(),
            seed: 0,
        }
    }
}

impl PretrainSection {
    pub fn validate(&self, world_size: u32) -> Result<(), ConfigError> {
        if !matches!(self.width, 1..=4) {
            return Err(invalid("pretrain.width", self.width, "expected 1, 2, 3 or 4".into()));
        }
        if self.variant == Variant::SimclrTfSk && !self.arch.bottleneck() {
            return Err(invalid(
                "pretrain.variant",
                "simclr_tf_sk",
                "selective kernels are in bottleneck blocks: pretrain.arch = \"resnet50\", \"resnet101\" or \"resnet152\""
                    .into(),
            ));
        }
        if self.input_normalisation == InputNormalisation::Imagenet && self.stem != Stem::Repeat3 {
            return Err(invalid(
                "pretrain.input_normalisation",
                "imagenet",
                "ImageNet's statistics are per RGB channel: it needs pretrain.stem = \"repeat3\"".into(),
            ));
        }
        if !(1..=4).contains(&self.head_layers) {
            return Err(invalid("pretrain.head_layers", self.head_layers, "expected 1..=4".into()));
        }
        if self.head_out < 1 || self.head_hidden < 0 {
            return Err(invalid("pretrain.head_out", self.head_out, "expected a positive width".into()));
        }
        let ws = world_size as usize;
        if self.enabled && (self.batch_size < 2 * ws || !self.batch_size.is_multiple_of(ws)) {
            return Err(invalid(
                "pretrain.batch_size",
                self.batch_size,
                format!("expected a multiple of cluster.world_size ({ws}) with at least 2 images per worker"),
            ));
        }
        let g = self.bn_group_size;
        if g > 0 && g < ws && !ws.is_multiple_of(g) {
            return Err(invalid(
                "pretrain.bn_group_size",
                g,
                format!("expected 0 (all ranks) or a divisor of cluster.world_size ({world_size})"),
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(invalid("pretrain.temperature", self.temperature, "expected a positive number".into()));
        }
        for (key, value) in [
            ("pretrain.base_lr", self.base_lr),
            ("pretrain.weight_decay", self.weight_decay),
            ("pretrain.warmup_epochs", self.warmup_epochs),
            ("pretrain.bucket_mb", self.bucket_mb),
        ] {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(invalid(key, value, "expected a non-negative number".into()));
            }
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(invalid("pretrain.momentum", self.momentum, "expected 0 <= momentum < 1".into()));
        }
        if !(16..=1024).contains(&self.input_size) {
            return Err(invalid("pretrain.input_size", self.input_size, "expected 16..=1024 pixels".into()));
        }
        if self.enabled && self.epochs == 0 && self.max_steps == 0 {
            return Err(invalid("pretrain.epochs", 0, "expected at least 1 (or pretrain.enabled = false)".into()));
        }
        self.monitor.validate()?;
        self.augment.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augment_preset_with_overrides() {
        let c: PretrainSection = toml::from_str("[augment]\npreset = \"simclr\"\nblur_p = 0.2\n").unwrap();
        assert_eq!(c.augment, AugmentConfig { blur_p: 0.2, ..AugmentConfig::simclr() });
        let c: PretrainSection = toml::from_str("").unwrap();
        assert_eq!(c.augment, AugmentConfig::cxr());
        // The effective config spells out every value and reads back the same.
        let text = toml::to_string(&PretrainSection { augment: c.augment, ..Default::default() }).unwrap();
        assert!(text.contains("rotation_degrees = 10.0"), "{text}");
        assert_eq!(toml::from_str::<PretrainSection>(&text).unwrap().augment, AugmentConfig::cxr());
        let err = toml::from_str::<PretrainSection>("[augment]\nhue = 0.1\n").unwrap_err();
        assert!(err.to_string().contains("hue"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let bad = PretrainSection { batch_size: 10, ..Default::default() };
        assert!(bad.validate(4).unwrap_err().to_string().contains("pretrain.batch_size"));
        bad.validate(2).unwrap();
        let bad =
            PretrainSection { augment: AugmentConfig { blur_p: 1.5, ..AugmentConfig::cxr() }, ..Default::default() };
        assert!(bad.validate(1).unwrap_err().to_string().contains("pretrain.augment.blur_p"));
        let bad = PretrainSection {
            augment: AugmentConfig { crop_scale: (0.9, 0.2), ..AugmentConfig::cxr() },
            ..Default::default()
        };
        assert!(bad.validate(1).unwrap_err().to_string().contains("crop_scale"));
    }
}
