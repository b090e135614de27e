//! `simclr-coordinator import-weights`: published encoders into this project's encoder files
//! (safetensors, torchvision's parameter names, metadata saying where they came from).
//!
//! Reads PyTorch-family files in Rust, with no Python and no libtorch (the coordinator never links it):
//! `torch.save` state dicts of torchvision and timm ResNets, Lightning `.ckpt` files (solo-learn's
//! among them), lightly's `nn.Sequential` backbones, DataParallel and MoCo prefixes, and safetensors
//! with any of those names. The encoder is found by its keys ([`resnet_keys`]), its architecture and
//! width by its shapes, and every expected tensor must be there with the expected shape.
//!
//! What it must not do: guess. Several encoders in one file, a missing tensor, a shape that fits no
//! ResNet this project builds: each is an error naming the key; `--strict` also refuses tensors under
//! the encoder's prefix that are not the encoder's.

pub mod pickle;
pub mod resnet_keys;
pub mod simclr_tf;
pub mod tf_bundle;
pub mod torch_file;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use resnet_keys::Shape;
use simclr_common::pretrain::Variant;
use torch_file::{DType, RawTensor};

/// Where a checkpoint comes from; it decides which encoder to take when a file holds several, and
/// the input normalisation the encoder was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// `torch.save(torchvision.models.resnet50().state_dict())`, or any state dict with its names.
    Torchvision,
    /// timm's ResNets (`timm.create_model("resnet50")`): torchvision's names; `.pth` or `.safetensors`.
    Timm,
    /// A Lightning checkpoint (`state_dict` of the LightningModule, the encoder under an attribute).
    Lightning,
    /// solo-learn's checkpoints: Lightning, the encoder under `backbone.` (not `momentum_backbone.`).
    SoloLearn,
    /// lightly's backbones: `nn.Sequential(*list(resnet.children())[:-1])`, numbered children.
    Lightly,
    /// google-research/simclr's TensorFlow checkpoints (SimCLR v1 and v2; TF1 or TF2 names; selective
    /// kernels or not), read from the tensor bundle.
    SimclrTf,
}

impl SourceFormat {
    pub const NAMES: &'static str = "torchvision, timm, lightning, solo-learn, lightly, simclr-tf";

    pub fn parse(s: &str) -> Option<SourceFormat> {
        Some(match s {
            "torchvision" | "torch" | "pytorch" => SourceFormat::Torchvision,
            "timm" => SourceFormat::Timm,
            "lightning" => SourceFormat::Lightning,
            "solo-learn" | "solo_learn" | "sololearn" => SourceFormat::SoloLearn,
            "lightly" => SourceFormat::Lightly,
            "simclr-tf" | "simclr_tf" | "simclr" | "simclr-v1" | "simclr-v2" | "tensorflow" => SourceFormat::SimclrTf,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SourceFormat::Torchvision => "torchvision",
            SourceFormat::Timm => "timm",
            SourceFormat::Lightning => "lightning",
            SourceFormat::SoloLearn => "solo-learn",
            SourceFormat::Lightly => "lightly",
            SourceFormat::SimclrTf => "simclr-tf",
        }
    }

    /// Prefix endings to prefer when a file holds several ResNets.
    fn preferred(self) -> &'static [&'static str] {
        match self {
            SourceFormat::SoloLearn | SourceFormat::Lightly | SourceFormat::Lightning => {
                &["state_dict.backbone.", ".backbone.", "backbone.", "encoder_q."]
            }
            SourceFormat::Torchvision | SourceFormat::Timm => &["encoder_q."],
            SourceFormat::SimclrTf => &[],
        }
    }

    /// The PyTorch family trains on inputs normalised with ImageNet's channel means and deviations;
    /// SimCLR's TensorFlow models on pixels in [0, 1] as they are.
    fn default_normalisation(self) -> Normalisation {
        match self {
            SourceFormat::SimclrTf => Normalisation::None,
            _ => Normalisation::Imagenet,
        }
    }
}

/// How images must be scaled before they meet the encoder, recorded in the file's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalisation {
    /// Pixels in [0, 1] as they are (this project's own encoders, SimCLR's TensorFlow models).
    None,
    /// (x - mean) / std with ImageNet's per-channel mean and deviation.
    Imagenet,
}

impl Normalisation {
    pub fn parse(s: &str) -> Option<Normalisation> {
        match s {
            "none" => Some(Normalisation::None),
            "imagenet" => Some(Normalisation::Imagenet),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Normalisation::None => "none",
            Normalisation::Imagenet => "imagenet",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub from: SourceFormat,
    pub input: PathBuf,
    pub output: PathBuf,
    /// The key prefix of the encoder, when a file holds several.
    pub prefix: Option<String>,
    /// Refuse tensors under the encoder's prefix that are not the encoder's.
    pub strict: bool,
    /// Overrides the format's usual input normalisation.
    pub normalisation: Option<Normalisation>,
}

/// What an import found and wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub shape: Shape,
    pub prefix: String,
    pub tensors: usize,
    pub parameters: usize,
    pub classifier: bool,
    /// Tensors under the encoder's prefix that were not taken.
    pub leftovers: Vec<String>,
    /// Tensors elsewhere in the file (heads, optimiser states, a momentum encoder).
    pub other_tensors: usize,
    pub normalisation: Normalisation,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("{detail}")]
    NoEncoder { detail: String },
    #[error("{detail}")]
    Unsupported { detail: String },
    #[error("{key}: {detail}")]
    BadTensor { key: String, detail: String },
    #[error("{count} tensors under '{prefix}' are not the encoder's (--strict), the first: {first:?}")]
    Leftovers { prefix: String, count: usize, first: Vec<String> },
    #[error("cannot write {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
}

/// The names and shapes every encoder of `shape` has (classifier excluded): torchvision's, and for
/// SimCLR v2's selective-kernel layout the worker's names for its extra parts (`engine/model.rs`).
pub fn expected_tensors(shape: &Shape) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    let base = if shape.arch.starts_with("tiny") { 2 } else { 64 * shape.width };
    let sk = shape.variant == Variant::SimclrTfSk;
    let bn = |out: &mut BTreeMap<String, Vec<usize>>, name: &str, c: usize| {
        for s in ["weight", "bias", "running_mean", "running_var"] {
            out.insert(format!("{name}.{s}"), vec![c]);
        }
        out.insert(format!("{name}.num_batches_tracked"), vec![]);
    };
    if sk {
        out.insert("conv1.0.weight".into(), vec![base / 2, shape.in_channels, 3, 3]);
        bn(&mut out, "conv1.1", base / 2);
        out.insert("conv1.3.weight".into(), vec![base / 2, base / 2, 3, 3]);
        bn(&mut out, "conv1.4", base / 2);
        out.insert("conv1.6.weight".into(), vec![base, base / 2, 3, 3]);
    } else {
        out.insert("conv1.weight".into(), vec![base, shape.in_channels, 7, 7]);
    }
    bn(&mut out, "bn1", base);
    let mut channels = base;
    for (stage, &n) in shape.blocks.iter().enumerate() {
        let planes = base << stage;
        for i in 0..n {
            let p = format!("layer{}.{i}", stage + 1);
            let stride = if stage > 0 && i == 0 { 2 } else { 1 };
            let cout = if shape.bottleneck {
                let streams = if sk { 2 } else { 1 };
                out.insert(format!("{p}.conv1.weight"), vec![planes, channels, 1, 1]);
                out.insert(format!("{p}.conv2.weight"), vec![streams * planes, planes, 3, 3]);
                out.insert(format!("{p}.conv3.weight"), vec![planes * 4, planes, 1, 1]);
                bn(&mut out, &format!("{p}.bn1"), planes);
                bn(&mut out, &format!("{p}.bn2"), streams * planes);
                bn(&mut out, &format!("{p}.bn3"), planes * 4);
                if sk {
                    // SimCLR v2: sk_ratio 0.0625, at least 32 channels.
                    let mid = (planes / 16).max(32);
                    out.insert(format!("{p}.sk.reduce.weight"), vec![mid, planes, 1, 1]);
                    bn(&mut out, &format!("{p}.sk.bn"), mid);
                    out.insert(format!("{p}.sk.expand.weight"), vec![2 * planes, mid, 1, 1]);
                }
                planes * 4
            } else {
                out.insert(format!("{p}.conv1.weight"), vec![planes, channels, 3, 3]);
                out.insert(format!("{p}.conv2.weight"), vec![planes, planes, 3, 3]);
                bn(&mut out, &format!("{p}.bn1"), planes);
                bn(&mut out, &format!("{p}.bn2"), planes);
                planes
            };
            if stride != 1 || channels != cout {
                let (c, b) = if sk { (1, 2) } else { (0, 1) };
                out.insert(format!("{p}.downsample.{c}.weight"), vec![cout, channels, 1, 1]);
                bn(&mut out, &format!("{p}.downsample.{b}"), cout);
            }
            channels = cout;
        }
    }
    out
}

/// Reads `options.input`, finds the encoder, checks it and writes `options.output`.
pub fn import_weights(options: &ImportOptions) -> Result<ImportReport, ImportError> {
    if options.from == SourceFormat::SimclrTf {
        return import_simclr_tf(options);
    }
    let tensors = torch_file::read_tensors(&options.input)?;
    let lightning = matches!(options.from, SourceFormat::Lightning | SourceFormat::SoloLearn);
    if lightning && !tensors.keys().any(|k| k.starts_with("state_dict.")) {
        return Err(ImportError::NoEncoder {
            detail: format!(
                "{}: no 'state_dict' entry, so not a Lightning checkpoint; try --from torchvision",
                options.input.display()
            ),
        });
    }
    let found = resnet_keys::choose(&tensors, options.prefix.as_deref(), options.from.preferred())?;
    if options.from == SourceFormat::Lightly && !found.sequential && options.prefix.is_none() {
        tracing::info!(prefix = %found.prefix, "torchvision-style names in a lightly checkpoint; taken as they are");
    }
    let in_file = tensors.len();
    let (mut encoder, leftovers) = resnet_keys::rename(tensors, &found);
    if options.strict && !leftovers.is_empty() {
        return Err(ImportError::Leftovers {
            prefix: found.prefix.clone(),
            count: leftovers.len(),
            first: leftovers.iter().take(5).cloned().collect(),
        });
    }
    let shape = resnet_keys::infer_shape(&encoder)?;
    let classifier = check_encoder(&mut encoder, &shape, &found.prefix)?;
    let normalisation = options.normalisation.unwrap_or(options.from.default_normalisation());
    let metadata = metadata(options.from.name(), &options.input, &found.prefix, normalisation, classifier, &shape);
    let parameters = parameter_count(&encoder);
    write_encoder(&options.output, &encoder, metadata)?;
    let taken = encoder.len();
    Ok(ImportReport {
        prefix: found.prefix,
        tensors: taken,
        parameters,
        classifier,
        other_tensors: in_file.saturating_sub(taken + leftovers.len()),
        leftovers,
        shape,
        normalisation,
    })
}

/// The encoder file's metadata: where it came from, and the layout and input scaling the worker checks
/// against the job's settings.
fn metadata(
    source_format: &str,
    source_file: &Path,
    prefix: &str,
    normalisation: Normalisation,
    classifier: bool,
    shape: &Shape,
) -> HashMap<String, String> {
    [
        ("format", "simclr-cluster encoder".to_string()),
        ("source_format", source_format.to_string()),
        ("source_file", source_file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()),
        ("source_prefix", prefix.to_string()),
        ("input_normalisation", normalisation.name().to_string()),
        ("classifier", if classifier { "fc" } else { "none" }.to_string()),
        ("arch", shape.arch.to_string()),
        ("width", shape.width.to_string()),
        ("stem", if shape.in_channels == 1 { "native1" } else { "repeat3" }.to_string()),
        ("variant", shape.variant.name().to_string()),
        ("selective_kernels", (shape.variant == Variant::SimclrTfSk).to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Trainable elements: every tensor but BatchNorm's running statistics and counters.
fn parameter_count(encoder: &BTreeMap<String, RawTensor>) -> usize {
    encoder
        .iter()
        .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var") && !n.ends_with("tracked"))
        .map(|(_, t)| t.numel())
        .sum()
}

/// google-research/simclr's TensorFlow checkpoints ([`simclr_tf`]).
fn import_simclr_tf(options: &ImportOptions) -> Result<ImportReport, ImportError> {
    let prefix = simclr_tf::locate(&options.input).ok_or_else(|| ImportError::Unreadable {
        path: options.input.clone(),
        reason: "not a TensorFlow checkpoint: expected a checkpoint prefix (model.ckpt-NNN, with its .index and \
                 .data files beside it), its .index file, a checkpoint directory or a SavedModel directory"
            .into(),
    })?;
    let bundle = tf_bundle::BundleIndex::open(&prefix)?;
    let shapes = bundle.shapes();
    let in_file = shapes.len();
    let plan = simclr_tf::plan(&shapes, options.prefix.as_deref())?;
    // Only the encoder's tensors are read: a training checkpoint's slots and averages stay on disk.
    let wanted: std::collections::BTreeSet<&str> = plan.renames.iter().map(|(tf, _)| tf.as_str()).collect();
    let mut tensors = bundle.read(|name| wanted.contains(name))?;
    let expected = expected_tensors(&plan.shape);
    let mut encoder = simclr_tf::apply(&plan, &mut tensors, &expected)?;
    check_encoder(&mut encoder, &plan.shape, "")?;
    // Under the ResNet's scope nothing else is the encoder's but optimiser slots and moving averages.
    let leftovers: Vec<String> = shapes
        .keys()
        .filter(|k| !wanted.contains(k.as_str()))
        .filter(|k| {
            k.starts_with(&plan.prefix)
                && !k.contains("OPTIMIZER_SLOT")
                && !k.ends_with("/Momentum")
                && !k.ends_with("/ExponentialMovingAverage")
        })
        .cloned()
        .collect();
    if options.strict && !leftovers.is_empty() {
        return Err(ImportError::Leftovers {
            prefix: plan.prefix.clone(),
            count: leftovers.len(),
            first: leftovers.iter().take(5).cloned().collect(),
        });
    }
    let normalisation = options.normalisation.unwrap_or(options.from.default_normalisation());
    let naming = match plan.naming {
        simclr_tf::Naming::Tf1 => "tf1",
        simclr_tf::Naming::Tf2 => "tf2",
    };
    let source = format!("{} ({naming})", options.from.name());
    let metadata = metadata(&source, &prefix, &plan.prefix, normalisation, false, &plan.shape);
    let parameters = parameter_count(&encoder);
    write_encoder(&options.output, &encoder, metadata)?;
    let taken = encoder.len();
    Ok(ImportReport {
        prefix: plan.prefix,
        tensors: taken,
        parameters,
        classifier: false,
        other_tensors: in_file.saturating_sub(plan.renames.len() + leftovers.len()),
        leftovers,
        shape: plan.shape,
        normalisation,
    })
}

/// Checks that `encoder` holds every tensor of a `shape` encoder with its shape (a missing
/// `num_batches_tracked` becomes 0) and nothing else but a classifier that fits its features, which it
/// says whether it kept. Errors name the key as the source file spells it (`prefix` + name).
fn check_encoder(encoder: &mut BTreeMap<String, RawTensor>, shape: &Shape, prefix: &str) -> Result<bool, ImportError> {
    let expected = expected_tensors(shape);
    let source_key = |name: &str| format!("{}{name}", prefix);
    for (name, dims) in &expected {
        match encoder.get(name) {
            None if name.ends_with("num_batches_tracked") => {
                encoder.insert(name.clone(), RawTensor { dtype: DType::I64, shape: vec![], data: vec![0; 8] });
            }
            None => {
                return Err(ImportError::BadTensor {
                    key: source_key(name),
                    detail: format!("missing: a {} (width {}) has it, shape {dims:?}", shape.arch, shape.width),
                })
            }
            Some(t) if name.ends_with("num_batches_tracked") => {
                if t.numel() != 1 {
                    return Err(ImportError::BadTensor { key: source_key(name), detail: "not a scalar".into() });
                }
            }
            Some(t) if &t.shape != dims => {
                return Err(ImportError::BadTensor {
                    key: source_key(name),
                    detail: format!(
                        "shape {:?}, but a {} of width {} with {} input channels has {dims:?}",
                        t.shape, shape.arch, shape.width, shape.in_channels
                    ),
                })
            }
            Some(t) if !t.dtype.is_float() => {
                return Err(ImportError::BadTensor { key: source_key(name), detail: format!("{:?} elements", t.dtype) })
            }
            Some(_) => {}
        }
    }
    let feature_dim = expected.get(&last_bn_weight(shape)).map(|d| d[0]).unwrap_or(0);
    let classifier = match (encoder.get("fc.weight"), encoder.get("fc.bias")) {
        (Some(w), Some(b)) if w.shape.len() == 2 && w.shape[1] == feature_dim && b.shape == [w.shape[0]] => true,
        (None, None) => false,
        _ => {
            tracing::warn!("the classifier (fc) does not fit the encoder's features; left out");
            encoder.remove("fc.weight");
            encoder.remove("fc.bias");
            false
        }
    };
    for name in encoder.keys() {
        if !expected.contains_key(name) && !name.starts_with("fc.") {
            return Err(ImportError::BadTensor {
                key: source_key(name),
                detail: format!("not a tensor of a {} with {:?} blocks", shape.arch, shape.blocks),
            });
        }
    }
    Ok(classifier)
}

fn last_bn_weight(shape: &Shape) -> String {
    let k = if shape.bottleneck { 3 } else { 2 };
    format!("layer4.{}.bn{k}.weight", shape.blocks[3] - 1)
}

/// Writes float tensors as f32 and integers as i64, atomically.
fn write_encoder(
    path: &Path,
    encoder: &BTreeMap<String, RawTensor>,
    metadata: HashMap<String, String>,
) -> Result<(), ImportError> {
    let converted: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = encoder
        .iter()
        .map(|(name, t)| {
            if t.dtype == DType::F32 {
                (name.clone(), safetensors::Dtype::F32, t.shape.clone(), t.data.clone())
            } else if t.dtype.is_float() {
                let data = t.to_f32().iter().flat_map(|v| v.to_le_bytes()).collect();
                (name.clone(), safetensors::Dtype::F32, t.shape.clone(), data)
            } else {
                let data = (0..t.numel()).flat_map(|i| t.int_at(i).to_le_bytes()).collect();
                (name.clone(), safetensors::Dtype::I64, t.shape.clone(), data)
            }
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = converted
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map_err(|e| ImportError::Write { path: path.to_path_buf(), reason: format!("{name}: {e:?}") })?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_, ImportError>>()?;
    let bytes = safetensors::tensor::serialize(views, &Some(metadata))
        .map_err(|e| ImportError::Write { path: path.to_path_buf(), reason: format!("{e:?}") })?;
    simclr_common::atomic_file::write_atomic(path, |tmp| std::fs::write(tmp, &bytes))
        .map_err(|e| ImportError::Write { path: path.to_path_buf(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zeros(shape: &[usize]) -> RawTensor {
        let n: usize = shape.iter().product();
        RawTensor { dtype: DType::F32, shape: shape.to_vec(), data: vec![0; 4 * n] }
    }

    fn encoder_of(shape: &Shape) -> BTreeMap<String, RawTensor> {
        expected_tensors(shape).into_iter().map(|(k, dims)| (k, zeros(&dims))).collect()
    }

    fn shape(arch: &'static str, blocks: [usize; 4], bottleneck: bool, width: usize) -> Shape {
        Shape { arch, width, in_channels: 3, blocks, bottleneck, variant: Variant::Torchvision }
    }

    #[test]
    fn expected_tensors_count_torchvisions_parameters() {
        // torchvision without fc: resnet18 11,176,512; resnet34 21,284,672; resnet50 23,508,032;
        // resnet101 42,500,160; resnet152 58,143,808. SimCLR's ResNet-50 (2x): 94M in the paper's table.
        let count = |s: &Shape| -> usize {
            expected_tensors(s)
                .iter()
                .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var") && !k.ends_with("tracked"))
                .map(|(_, d)| d.iter().product::<usize>())
                .sum()
        };
        assert_eq!(count(&shape("resnet18", [2, 2, 2, 2], false, 1)), 11_176_512);
        assert_eq!(count(&shape("resnet34", [3, 4, 6, 3], false, 1)), 21_284_672);
        assert_eq!(count(&shape("resnet50", [3, 4, 6, 3], true, 1)), 23_508_032);
        assert_eq!(count(&shape("resnet101", [3, 4, 23, 3], true, 1)), 42_500_160);
        assert_eq!(count(&shape("resnet152", [3, 8, 36, 3], true, 1)), 58_143_808);
        assert!((93_500_000..94_500_000).contains(&count(&shape("resnet50", [3, 4, 6, 3], true, 2))));
    }

    #[test]
    fn a_wrong_shape_a_missing_tensor_and_a_stray_one_are_named() {
        let r18 = shape("resnet18", [2, 2, 2, 2], false, 1);
        let mut ok = encoder_of(&r18);
        ok.remove("layer1.0.bn1.num_batches_tracked");
        ok.insert("fc.weight".into(), zeros(&[10, 512]));
        ok.insert("fc.bias".into(), zeros(&[10]));
        assert!(check_encoder(&mut ok, &r18, "model.").unwrap(), "the classifier fits");
        assert_eq!(ok["layer1.0.bn1.num_batches_tracked"].dtype, DType::I64);

        let mut wrong = encoder_of(&r18);
        wrong.insert("layer2.1.conv2.weight".into(), zeros(&[128, 128, 1, 1]));
        let e = check_encoder(&mut wrong, &r18, "model.").unwrap_err().to_string();
        assert!(
            e.starts_with("model.layer2.1.conv2.weight: shape [128, 128, 1, 1]") && e.contains("[128, 128, 3, 3]"),
            "{e}"
        );

        let mut missing = encoder_of(&r18);
        missing.remove("layer3.0.downsample.0.weight");
        let e = check_encoder(&mut missing, &r18, "").unwrap_err().to_string();
        assert!(e.starts_with("layer3.0.downsample.0.weight: missing"), "{e}");

        let mut stray = encoder_of(&r18);
        stray.insert("layer1.0.conv3.weight".into(), zeros(&[64, 64, 1, 1]));
        let e = check_encoder(&mut stray, &r18, "").unwrap_err().to_string();
        assert!(e.starts_with("layer1.0.conv3.weight: not a tensor of a resnet18"), "{e}");

        let mut unfit = encoder_of(&r18);
        unfit.insert("fc.weight".into(), zeros(&[10, 2048]));
        unfit.insert("fc.bias".into(), zeros(&[10]));
        assert!(!check_encoder(&mut unfit, &r18, "").unwrap(), "a classifier of another width is left out");
        assert!(!unfit.contains_key("fc.weight"));
    }
}
