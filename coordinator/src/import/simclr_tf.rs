//! google-research/simclr's TensorFlow encoders: the ResNets of SimCLR v1 and v2 (50/101/152, width
//! 1x-4x, selective kernels or not) from their checkpoints, in either naming:
//!
//! - TF1 (`tf.compat.v1.train.Saver`; SimCLR v1, and v2's TF1 checkpoints): `tf.layers` names numbered in
//!   creation order under the model's scope, `base_model/conv2d_7/kernel`,
//!   `base_model/batch_normalization_7/gamma`. Convolutions and BatchNorms are numbered separately; the
//!   net creates, per block, the projection shortcut first, then the three convolutions (with selective
//!   kernels the middle one is the two-stream convolution, its BatchNorm, then the mixing layer's two
//!   1x1 convolutions with a BatchNorm between). The numbering alone therefore gives the layout once the
//!   block count is known, and the count follows from how many convolutions there are.
//! - TF2 (`tf.train.Checkpoint`, a SavedModel's `variables/`): object paths,
//!   `model/resnet_model/block_groups/1/layers/0/projection_layers/0/conv2d/kernel/.ATTRIBUTES/VARIABLE_VALUE`,
//!   where the indices are positions in the Keras layers' lists.
//!
//! Kernels are HWIO and become OIHW; BatchNorm's gamma/beta/moving statistics become
//! weight/bias/running_mean/running_var. Optimiser slots (`.../Momentum`, `.OPTIMIZER_SLOT`), the
//! projection and supervised heads and the step counter are not the encoder's and stay behind.
//!
//! Only bottleneck nets are mapped: TensorFlow's BasicBlock nets project the first stage's shortcut,
//! which torchvision's ResNet-18/34 have no tensor for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use simclr_common::pretrain::Variant;

use super::resnet_keys::Shape;
use super::torch_file::RawTensor;
use super::ImportError;

/// TensorFlow's BatchNorm variables and their torch names.
const BN_VARS: [(&str, &str); 4] =
    [("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var")];

/// Which naming a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Tf1,
    Tf2,
}

/// How each of the encoder's TensorFlow variables becomes one of ours.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub naming: Naming,
    /// The scope (TF1) or object path (TF2) the ResNet sits under.
    pub prefix: String,
    pub shape: Shape,
    /// (TensorFlow name, our name); kernels are transposed from HWIO.
    pub renames: Vec<(String, String)>,
}

/// A bundle prefix for `path`: the prefix itself, its `.index` or a data shard, a SavedModel directory
/// (its `variables/variables`), or a checkpoint directory (the file its `checkpoint` names, else its
/// only `.index`).
pub fn locate(path: &Path) -> Option<PathBuf> {
    if path.is_dir() {
        let saved = path.join("variables").join("variables");
        if saved.with_extension("index").is_file() {
            return Some(saved);
        }
        if let Ok(text) = std::fs::read_to_string(path.join("checkpoint")) {
            for line in text.lines() {
                if let Some(rest) = line.trim().strip_prefix("model_checkpoint_path:") {
                    let name = rest.trim().trim_matches('"');
                    let candidate = path.join(name);
                    if PathBuf::from(format!("{}.index", candidate.display())).is_file() {
                        return Some(candidate);
                    }
                }
            }
        }
        let indices: Vec<PathBuf> = std::fs::read_dir(path)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "index"))
            .collect();
        return match indices.as_slice() {
            [one] => Some(one.with_extension("")),
            _ => None,
        };
    }
    super::tf_bundle::bundle_prefix(path)
}

/// The plan for a checkpoint whose variables have these shapes; `prefix` picks the ResNet when there
/// are several.
pub fn plan(shapes: &BTreeMap<String, Vec<usize>>, prefix: Option<&str>) -> Result<Plan, ImportError> {
    if shapes.keys().any(|k| k.ends_with("/.ATTRIBUTES/VARIABLE_VALUE")) {
        plan_tf2(shapes, prefix)
    } else {
        plan_tf1(shapes, prefix)
    }
}

fn unsupported(detail: String) -> ImportError {
    ImportError::Unsupported { detail }
}

fn choose_prefix(found: Vec<String>, prefix: Option<&str>, what: &str) -> Result<String, ImportError> {
    let listed = || found.iter().map(|p| format!("'{p}'")).collect::<Vec<_>>().join(", ");
    if let Some(p) = prefix {
        return found.iter().find(|f| *f == p).cloned().ok_or_else(|| ImportError::NoEncoder {
            detail: format!("no SimCLR ResNet under --prefix '{p}'; found under: {}", listed()),
        });
    }
    match found.as_slice() {
        [] => Err(ImportError::NoEncoder { detail: format!("no SimCLR ResNet found: expected {what}") }),
        [one] => Ok(one.clone()),
        _ => Err(ImportError::NoEncoder {
            detail: format!("several ResNets in the checkpoint, under {}: name one with --prefix", listed()),
        }),
    }
}

/// The architecture with `blocks` bottleneck blocks per stage, and its stage-1 width.
fn arch_of(blocks: [usize; 4], stem_channels: usize, variant: Variant) -> Result<Shape, ImportError> {
    let arch = match blocks {
        [3, 4, 6, 3] => "resnet50",
        [3, 4, 23, 3] => "resnet101",
        [3, 8, 36, 3] => "resnet152",
        [1, 1, 1, 1] if stem_channels == 2 => "tiny_bottleneck",
        _ => {
            return Err(unsupported(format!(
                "a ResNet with {blocks:?} bottleneck blocks per stage is none of ResNet-50/101/152"
            )))
        }
    };
    let width = if arch == "tiny_bottleneck" { 1 } else { stem_channels / 64 };
    if arch != "tiny_bottleneck" && (!stem_channels.is_multiple_of(64) || !(1..=4).contains(&width)) {
        return Err(unsupported(format!("the stem has {stem_channels} channels: no width multiplier 1x-4x")));
    }
    Ok(Shape { arch, width, in_channels: 3, blocks, bottleneck: true, variant })
}

/// Our names, in the order the TensorFlow net creates them: (convolutions, BatchNorms).
fn creation_order(blocks: [usize; 4], sk: bool) -> (Vec<String>, Vec<String>) {
    let (mut convs, mut bns) = (Vec::new(), Vec::new());
    if sk {
        convs.extend(["conv1.0", "conv1.3", "conv1.6"].map(String::from));
        bns.extend(["conv1.1", "conv1.4", "bn1"].map(String::from));
    } else {
        convs.push("conv1".into());
        bns.push("bn1".into());
    }
    for (stage, &n) in blocks.iter().enumerate() {
        for b in 0..n {
            let p = format!("layer{}.{b}", stage + 1);
            if b == 0 {
                let (c, n) = if sk { (1, 2) } else { (0, 1) };
                convs.push(format!("{p}.downsample.{c}"));
                bns.push(format!("{p}.downsample.{n}"));
            }
            convs.push(format!("{p}.conv1"));
            bns.push(format!("{p}.bn1"));
            convs.push(format!("{p}.conv2"));
            bns.push(format!("{p}.bn2"));
            if sk {
                convs.push(format!("{p}.sk.reduce"));
                bns.push(format!("{p}.sk.bn"));
                convs.push(format!("{p}.sk.expand"));
            }
            convs.push(format!("{p}.conv3"));
            bns.push(format!("{p}.bn3"));
        }
    }
    (convs, bns)
}

/// `base_model/conv2d_12/kernel` -> ("base_model/", "conv2d", 12).
fn tf1_layer(key: &str) -> Option<(&str, &str, usize, &str)> {
    let (scope_and_layer, var) = key.rsplit_once('/')?;
    let (scope, layer) = match scope_and_layer.rsplit_once('/') {
        Some((s, l)) => (&key[..s.len() + 1], l),
        None => ("", scope_and_layer),
    };
    for kind in ["conv2d", "batch_normalization"] {
        if layer == kind {
            return Some((scope, kind, 0, var));
        }
        if let Some(n) = layer.strip_prefix(kind).and_then(|r| r.strip_prefix('_')) {
            if let Ok(n) = n.parse::<usize>() {
                return Some((scope, kind, n, var));
            }
        }
    }
    None
}

fn plan_tf1(shapes: &BTreeMap<String, Vec<usize>>, prefix: Option<&str>) -> Result<Plan, ImportError> {
    let mut scopes: Vec<String> = shapes
        .keys()
        .filter_map(|k| tf1_layer(k).filter(|(_, kind, n, var)| *kind == "conv2d" && *n == 0 && *var == "kernel"))
        .map(|(scope, ..)| scope.to_string())
        .collect();
    scopes.dedup();
    let scope = choose_prefix(scopes, prefix, "TF1 names such as 'base_model/conv2d/kernel' (SimCLR v1)")?;
    let mut convs = BTreeMap::new();
    let mut bns = BTreeMap::new();
    for (key, _) in shapes.range(scope.clone()..) {
        if !key.starts_with(&scope) {
            break;
        }
        match tf1_layer(key) {
            Some((s, "conv2d", n, "kernel")) if s == scope => {
                convs.insert(n, key.clone());
            }
            Some((s, "batch_normalization", n, "gamma")) if s == scope => {
                bns.insert(n, key.trim_end_matches("/gamma").to_string());
            }
            _ => {}
        }
    }
    let contiguous = |m: &BTreeMap<usize, String>| m.keys().copied().eq(0..m.len());
    if !contiguous(&convs) || !contiguous(&bns) {
        return Err(unsupported(format!(
            "{scope}: the convolutions or BatchNorms are not numbered 0..n (a checkpoint of a partial net?)"
        )));
    }
    let (nc, nb) = (convs.len(), bns.len());
    // Without selective kernels: stem 1 + 3 per block + 4 projections, as many BatchNorms. With them:
    // stem 3 + 5 per block + 4, and one BatchNorm fewer per block.
    let (sk, total_blocks) = if nc == nb {
        (false, nc.checked_sub(5).filter(|n| n % 3 == 0).map(|n| n / 3))
    } else {
        let blocks = nc.saturating_sub(nb);
        (true, Some(blocks).filter(|&b| 3 + 5 * b + 4 == nc))
    };
    let blocks = match total_blocks {
        Some(16) => [3, 4, 6, 3],
        Some(33) => [3, 4, 23, 3],
        Some(50) => [3, 8, 36, 3],
        Some(4) => [1, 1, 1, 1],
        _ => {
            return Err(unsupported(format!(
                "{scope}: {nc} convolutions and {nb} BatchNorms fit no SimCLR bottleneck ResNet (50/101/152); \
                 TensorFlow's ResNet-18/34 project the first stage's shortcut, which torchvision's do not"
            )))
        }
    };
    let stem_conv = if sk { &convs[&2] } else { &convs[&0] };
    let stem_channels = shapes[stem_conv].last().copied().unwrap_or(0);
    let variant = if sk { Variant::SimclrTfSk } else { Variant::SimclrTf };
    let mut shape = arch_of(blocks, stem_channels, variant)?;
    shape.in_channels = shapes[&convs[&0]].get(2).copied().unwrap_or(0);
    let (conv_names, bn_names) = creation_order(blocks, sk);
    let mut renames = Vec::new();
    for (tf, ours) in convs.values().zip(&conv_names) {
        renames.push((tf.clone(), format!("{ours}.weight")));
    }
    for (tf, ours) in bns.values().zip(&bn_names) {
        for (tf_var, var) in BN_VARS {
            renames.push((format!("{tf}/{tf_var}"), format!("{ours}.{var}")));
        }
    }
    Ok(Plan { naming: Naming::Tf1, prefix: scope, shape, renames })
}

const TF2_SUFFIX: &str = "/.ATTRIBUTES/VARIABLE_VALUE";

/// One TF2 variable of a block or the stem: (list index, sub-path) under a Keras layers list.
fn indexed<'a>(rest: &'a str, list: &str) -> Option<(usize, &'a str)> {
    let rest = rest.strip_prefix(list)?.strip_prefix('/')?;
    let (i, sub) = rest.split_once('/')?;
    Some((i.parse().ok()?, sub))
}

fn plan_tf2(shapes: &BTreeMap<String, Vec<usize>>, prefix: Option<&str>) -> Result<Plan, ImportError> {
    let vars: Vec<&str> =
        shapes.keys().filter(|k| !k.contains(".OPTIMIZER_SLOT")).filter_map(|k| k.strip_suffix(TF2_SUFFIX)).collect();
    let mut roots: Vec<String> =
        vars.iter().filter_map(|v| v.find("initial_conv_relu_max_pool/").map(|at| v[..at].to_string())).collect();
    roots.sort();
    roots.dedup();
    let root = choose_prefix(
        roots,
        prefix,
        "TF2 object paths such as 'model/resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel' (SimCLR v2)",
    )?;
    // Stem: (list index, what) -> name.
    let mut stem_convs = BTreeMap::new();
    let mut stem_bns = BTreeMap::new();
    // Per (group, block): projection conv/bn, plain convs/bns by index, selective-kernel parts.
    #[derive(Default)]
    struct Block {
        projection_conv: Option<String>,
        projection_bn: Option<String>,
        convs: BTreeMap<usize, String>,
        bns: BTreeMap<usize, String>,
        sk: BTreeMap<&'static str, String>,
        basic: bool,
    }
    let mut blocks: BTreeMap<(usize, usize), Block> = BTreeMap::new();
    for v in &vars {
        let Some(rest) = v.strip_prefix(root.as_str()) else { continue };
        if let Some((i, sub)) = indexed(rest, "initial_conv_relu_max_pool") {
            match sub {
                "conv2d/kernel" => {
                    stem_convs.insert(i, v.to_string());
                }
                "bn/gamma" => {
                    stem_bns.insert(i, v.trim_end_matches("/gamma").to_string());
                }
                _ => {}
            }
            continue;
        }
        let Some((group, rest)) = indexed(rest, "block_groups") else { continue };
        let Some((block, rest)) = indexed(rest, "layers") else { continue };
        let entry = blocks.entry((group, block)).or_default();
        let bn_of = |v: &str| v.trim_end_matches("/gamma").to_string();
        if let Some((_, sub)) = indexed(rest, "projection_layers") {
            match sub {
                "conv2d/kernel" => entry.projection_conv = Some(v.to_string()),
                "bn/gamma" => entry.projection_bn = Some(bn_of(v)),
                _ => {}
            }
        } else if let Some((i, sub)) = indexed(rest, "conv_relu_dropblock_layers") {
            match sub {
                "conv2d/kernel" => {
                    entry.convs.insert(i, v.to_string());
                }
                "bn/gamma" => {
                    entry.bns.insert(i, bn_of(v));
                }
                "conv2d_fixed_padding/conv2d/kernel" => {
                    entry.sk.insert("conv2", v.to_string());
                }
                "batch_norm_relu/bn/gamma" => {
                    entry.sk.insert("bn2", bn_of(v));
                }
                "conv2d_0/kernel" => {
                    entry.sk.insert("sk.reduce", v.to_string());
                }
                "batch_norm_relu_1/bn/gamma" => {
                    entry.sk.insert("sk.bn", bn_of(v));
                }
                "conv2d_1/kernel" => {
                    entry.sk.insert("sk.expand", v.to_string());
                }
                _ => {}
            }
        } else if rest.starts_with("conv2d_bn_layers/") || rest.starts_with("shortcut_layers/") {
            entry.basic = true;
        }
    }
    if blocks.values().any(|b| b.basic) {
        return Err(unsupported(format!(
            "{root}: a BasicBlock net (ResNet-18/34); TensorFlow's project the first stage's shortcut, which \
             torchvision's do not, so only SimCLR's bottleneck nets (50/101/152) are imported"
        )));
    }
    let sk = stem_convs.len() == 3;
    let mut counts = [0usize; 4];
    for &(group, block) in blocks.keys() {
        if group < 4 {
            counts[group] = counts[group].max(block + 1);
        }
    }
    if blocks.keys().any(|&(g, _)| g >= 4) || blocks.len() != counts.iter().sum::<usize>() {
        return Err(unsupported(format!("{root}: block groups {counts:?} are not four groups of numbered blocks")));
    }
    let stem_last = stem_convs.values().last().ok_or_else(|| ImportError::NoEncoder {
        detail: format!("{root}: no stem convolution under initial_conv_relu_max_pool"),
    })?;
    let stem_channels = shapes[&format!("{stem_last}{TF2_SUFFIX}")].last().copied().unwrap_or(0);
    let variant = if sk { Variant::SimclrTfSk } else { Variant::SimclrTf };
    let mut shape = arch_of(counts, stem_channels, variant)?;
    let first = stem_convs.values().next().expect("a stem convolution");
    shape.in_channels = shapes[&format!("{first}{TF2_SUFFIX}")].get(2).copied().unwrap_or(0);

    let mut renames = Vec::new();
    let conv = |renames: &mut Vec<(String, String)>, tf: &str, ours: &str| {
        renames.push((format!("{tf}{TF2_SUFFIX}"), format!("{ours}.weight")));
    };
    let bn = |renames: &mut Vec<(String, String)>, tf: &str, ours: &str| {
        for (tf_var, var) in BN_VARS {
            renames.push((format!("{tf}/{tf_var}{TF2_SUFFIX}"), format!("{ours}.{var}")));
        }
    };
    let (stem_conv_names, stem_bn_names): (&[&str], &[&str]) =
        if sk { (&["conv1.0", "conv1.3", "conv1.6"], &["conv1.1", "conv1.4", "bn1"]) } else { (&["conv1"], &["bn1"]) };
    if stem_bns.len() != stem_bn_names.len() {
        return Err(unsupported(format!(
            "{root}: {} stem BatchNorms, expected {}",
            stem_bns.len(),
            stem_bn_names.len()
        )));
    }
    for (tf, ours) in stem_convs.values().zip(stem_conv_names) {
        conv(&mut renames, tf, ours);
    }
    for (tf, ours) in stem_bns.values().zip(stem_bn_names) {
        bn(&mut renames, tf, ours);
    }
    for ((group, block), b) in &blocks {
        let p = format!("layer{}.{block}", group + 1);
        let missing = |what: &str| unsupported(format!("{root}block_groups/{group}/layers/{block}: no {what}"));
        if *block == 0 {
            let (c, n) = if sk { (1, 2) } else { (0, 1) };
            conv(
                &mut renames,
                b.projection_conv.as_ref().ok_or_else(|| missing("projection convolution"))?,
                &format!("{p}.downsample.{c}"),
            );
            bn(
                &mut renames,
                b.projection_bn.as_ref().ok_or_else(|| missing("projection BatchNorm"))?,
                &format!("{p}.downsample.{n}"),
            );
        }
        let plain: &[&str] = if sk { &["conv1", "conv3"] } else { &["conv1", "conv2", "conv3"] };
        let plain_bn: &[&str] = if sk { &["bn1", "bn3"] } else { &["bn1", "bn2", "bn3"] };
        if b.convs.len() != plain.len() || b.bns.len() != plain_bn.len() {
            return Err(missing(&format!("{} convolutions with BatchNorms", plain.len())));
        }
        for (tf, ours) in b.convs.values().zip(plain) {
            conv(&mut renames, tf, &format!("{p}.{ours}"));
        }
        for (tf, ours) in b.bns.values().zip(plain_bn) {
            bn(&mut renames, tf, &format!("{p}.{ours}"));
        }
        if sk {
            for part in ["conv2", "sk.reduce", "sk.expand"] {
                conv(
                    &mut renames,
                    b.sk.get(part).ok_or_else(|| missing(&format!("selective-kernel {part}")))?,
                    &format!("{p}.{part}"),
                );
            }
            for part in ["bn2", "sk.bn"] {
                bn(
                    &mut renames,
                    b.sk.get(part).ok_or_else(|| missing(&format!("selective-kernel {part}")))?,
                    &format!("{p}.{part}"),
                );
            }
        }
    }
    Ok(Plan { naming: Naming::Tf2, prefix: root, shape, renames })
}

/// HWIO -> OIHW.
fn kernel_to_oihw(t: RawTensor) -> RawTensor {
    let [h, w, i, o] = [t.shape[0], t.shape[1], t.shape[2], t.shape[3]];
    let size = t.dtype.size();
    let mut data = vec![0u8; t.data.len()];
    for hh in 0..h {
        for ww in 0..w {
            for ii in 0..i {
                for oo in 0..o {
                    let from = (((hh * w + ww) * i + ii) * o + oo) * size;
                    let to = (((oo * i + ii) * h + hh) * w + ww) * size;
                    data[to..to + size].copy_from_slice(&t.data[from..from + size]);
                }
            }
        }
    }
    RawTensor { dtype: t.dtype, shape: vec![o, i, h, w], data }
}

/// Moves the plan's tensors out of `tensors` under our names, checking each shape against what the
/// planned encoder has; the error names the TensorFlow variable.
pub fn apply(
    plan: &Plan,
    tensors: &mut BTreeMap<String, RawTensor>,
    expected: &BTreeMap<String, Vec<usize>>,
) -> Result<BTreeMap<String, RawTensor>, ImportError> {
    let mut out = BTreeMap::new();
    for (tf, ours) in &plan.renames {
        let t = tensors.remove(tf).ok_or_else(|| ImportError::BadTensor {
            key: tf.clone(),
            detail: format!("missing (it would be {ours})"),
        })?;
        let t = if t.shape.len() == 4 { kernel_to_oihw(t) } else { t };
        let want = expected.get(ours).ok_or_else(|| ImportError::BadTensor {
            key: tf.clone(),
            detail: format!("maps to {ours}, which a {} does not have", plan.shape.arch),
        })?;
        if &t.shape != want {
            return Err(ImportError::BadTensor {
                key: tf.clone(),
                detail: format!(
                    "shape {:?} (as OIHW) for {ours}, but a {} ({}, width {}) has {want:?}",
                    t.shape,
                    plan.shape.arch,
                    plan.shape.variant.name(),
                    plan.shape.width
                ),
            });
        }
        out.insert(ours.clone(), t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf1_names_split_into_scope_kind_and_number() {
        assert_eq!(tf1_layer("base_model/conv2d/kernel"), Some(("base_model/", "conv2d", 0, "kernel")));
        assert_eq!(
            tf1_layer("base_model/batch_normalization_12/moving_mean"),
            Some(("base_model/", "batch_normalization", 12, "moving_mean"))
        );
        assert_eq!(tf1_layer("a/b/conv2d_3/kernel"), Some(("a/b/", "conv2d", 3, "kernel")));
        assert_eq!(tf1_layer("conv2d_3/kernel"), Some(("", "conv2d", 3, "kernel")));
        assert_eq!(tf1_layer("base_model/conv2d_x/kernel"), None);
        assert_eq!(tf1_layer("head_contrastive/dense/kernel"), None);
    }

    #[test]
    fn creation_order_counts_match_the_block_arithmetic() {
        for (blocks, total) in [([3, 4, 6, 3], 16), ([3, 4, 23, 3], 33), ([3, 8, 36, 3], 50), ([1, 1, 1, 1], 4)] {
            let (c, b) = creation_order(blocks, false);
            assert_eq!((c.len(), b.len()), (1 + 3 * total + 4, 1 + 3 * total + 4));
            let (c, b) = creation_order(blocks, true);
            assert_eq!((c.len(), b.len()), (3 + 5 * total + 4, 3 + 4 * total + 4));
        }
    }

    #[test]
    fn kernels_move_from_hwio_to_oihw() {
        // A 1x2 kernel, 2 inputs, 3 outputs: element (h, w, i, o) holds 100h + 10w... as h*1000+w*100+i*10+o.
        let (h, w, i, o) = (1usize, 2usize, 2usize, 3usize);
        let mut values = Vec::new();
        for hh in 0..h {
            for ww in 0..w {
                for ii in 0..i {
                    for oo in 0..o {
                        values.push((hh * 1000 + ww * 100 + ii * 10 + oo) as f32);
                    }
                }
            }
        }
        let t = RawTensor {
            dtype: super::super::torch_file::DType::F32,
            shape: vec![h, w, i, o],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let moved = kernel_to_oihw(t);
        assert_eq!(moved.shape, vec![3, 2, 1, 2]);
        let got = moved.to_f32();
        // (o=2, i=1, h=0, w=1) is at ((2*2+1)*1+0)*2+1 = 11.
        assert_eq!(got[11], 112.0);
        assert_eq!(got[0], 0.0);
    }
}
