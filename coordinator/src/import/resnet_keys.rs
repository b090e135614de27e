//! Finds a ResNet encoder among a checkpoint's tensors and names it as torchvision does.
//!
//! Two layouts are recognised under any prefix:
//! - torchvision's `resnet*()` names (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, `fc.*`), which timm's
//!   ResNets share, as do solo-learn (`backbone.`), Lightning modules (`state_dict.<attribute>.`),
//!   DataParallel (`module.`) and MoCo (`module.encoder_q.`);
//! - lightly's `nn.Sequential(*list(resnet.children())[:-1])`, where the children are numbered: `0` the
//!   stem convolution, `1` its BatchNorm, `4`-`7` the four stages.
//!
//! A checkpoint may hold several encoders (a momentum encoder, MoCo's key encoder): then the format's
//! usual one is taken if there is exactly one, and otherwise the user names it with `--prefix`.

use std::collections::BTreeMap;

use super::torch_file::RawTensor;
use super::ImportError;

/// Where the encoder sits in a checkpoint and how its children are named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub prefix: String,
    pub sequential: bool,
}

const BN_SUFFIXES: [&str; 5] = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"];

/// The torchvision name of `rest` (a key with the prefix removed), or None if it is not a ResNet
/// encoder's tensor.
fn torchvision_name(rest: &str, sequential: bool) -> Option<String> {
    let renamed = if sequential {
        let (head, tail) = rest.split_once('.')?;
        match head {
            "0" if tail == "weight" => "conv1.weight".to_string(),
            "1" => format!("bn1.{tail}"),
            "4" | "5" | "6" | "7" => format!("layer{}.{tail}", head.parse::<u8>().ok()? - 3),
            _ => return None,
        }
    } else {
        rest.to_string()
    };
    let parts: Vec<&str> = renamed.split('.').collect();
    let ok = match parts.as_slice() {
        ["conv1", "weight"] => true,
        ["bn1", s] => BN_SUFFIXES.contains(s),
        ["fc", "weight" | "bias"] => !sequential,
        [layer, block, module, s] if is_layer(layer) && block.parse::<u32>().is_ok() => match *module {
            "conv1" | "conv2" | "conv3" => *s == "weight",
            "bn1" | "bn2" | "bn3" => BN_SUFFIXES.contains(s),
            _ => false,
        },
        [layer, block, "downsample", "0", "weight"] if is_layer(layer) && block.parse::<u32>().is_ok() => true,
        [layer, block, "downsample", "1", s] if is_layer(layer) && block.parse::<u32>().is_ok() => {
            BN_SUFFIXES.contains(s)
        }
        _ => false,
    };
    ok.then_some(renamed)
}

fn is_layer(s: &str) -> bool {
    matches!(s, "layer1" | "layer2" | "layer3" | "layer4")
}

/// Every prefix under which a whole ResNet stem and first block are present.
pub fn candidates(tensors: &BTreeMap<String, RawTensor>) -> Vec<Found> {
    let mut out = Vec::new();
    for key in tensors.keys() {
        if let Some(prefix) = key.strip_suffix("layer1.0.conv1.weight") {
            if tensors.contains_key(&format!("{prefix}conv1.weight")) {
                out.push(Found { prefix: prefix.to_string(), sequential: false });
            }
        }
        if let Some(prefix) = key.strip_suffix("4.0.conv1.weight") {
            let layer_prefix = prefix.ends_with('.') || prefix.is_empty();
            if layer_prefix && tensors.contains_key(&format!("{prefix}0.weight")) {
                out.push(Found { prefix: prefix.to_string(), sequential: true });
            }
        }
    }
    out
}

/// Chooses the encoder: the one the user named (`--prefix`), else the only candidate, else the
/// format's usual one (`preferred` ends with it and no other candidate does).
pub fn choose(
    tensors: &BTreeMap<String, RawTensor>,
    prefix: Option<&str>,
    preferred: &[&str],
) -> Result<Found, ImportError> {
    let all = candidates(tensors);
    let listed = || all.iter().map(|f| format!("'{}'", f.prefix)).collect::<Vec<_>>().join(", ");
    if let Some(p) = prefix {
        return all.iter().find(|f| f.prefix == p).cloned().ok_or_else(|| ImportError::NoEncoder {
            detail: format!(
                "no ResNet under --prefix '{p}'; ResNets found under: {}",
                if all.is_empty() { "none".to_string() } else { listed() }
            ),
        });
    }
    match all.len() {
        0 => {
            let sample: Vec<&String> = tensors.keys().take(8).collect();
            Err(ImportError::NoEncoder {
                detail: format!(
                    "no ResNet found: expected keys like 'conv1.weight' and 'layer1.0.conv1.weight' (torchvision, \
                     timm) or '0.weight' and '4.0.conv1.weight' (lightly's nn.Sequential) under one prefix; \
                     the file has {} tensors, the first: {sample:?}",
                    tensors.len()
                ),
            })
        }
        1 => Ok(all[0].clone()),
        _ => {
            for p in preferred {
                let hits: Vec<&Found> = all.iter().filter(|f| f.prefix.ends_with(p)).collect();
                if let [one] = hits.as_slice() {
                    return Ok((*one).clone());
                }
            }
            Err(ImportError::NoEncoder {
                detail: format!("several ResNets in the file, under {}: name one with --prefix", listed()),
            })
        }
    }
}

/// The encoder's tensors under torchvision names, and the file's other keys under the chosen prefix
/// that are not encoder tensors (a projection head, a classifier of another shape ...).
pub fn rename(tensors: BTreeMap<String, RawTensor>, found: &Found) -> (BTreeMap<String, RawTensor>, Vec<String>) {
    let mut encoder = BTreeMap::new();
    let mut leftovers = Vec::new();
    for (key, t) in tensors {
        let Some(rest) = key.strip_prefix(&found.prefix) else { continue };
        match torchvision_name(rest, found.sequential) {
            Some(name) => {
                encoder.insert(name, t);
            }
            None => leftovers.push(key),
        }
    }
    (encoder, leftovers)
}

/// What a set of torchvision-named tensors is: architecture, width, stem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub arch: &'static str,
    pub width: usize,
    pub in_channels: usize,
    pub blocks: [usize; 4],
    pub bottleneck: bool,
    pub variant: simclr_common::pretrain::Variant,
}

pub fn infer_shape(encoder: &BTreeMap<String, RawTensor>) -> Result<Shape, ImportError> {
    let dims = |name: &str| encoder.get(name).map(|t| t.shape.clone());
    let mut blocks = [0usize; 4];
    for key in encoder.keys() {
        if let Some(rest) = key.strip_prefix("layer") {
            let mut it = rest.split('.');
            let (Some(l), Some(b)) = (it.next(), it.next()) else { continue };
            if let (Ok(l), Ok(b)) = (l.parse::<usize>(), b.parse::<usize>()) {
                if (1..=4).contains(&l) {
                    blocks[l - 1] = blocks[l - 1].max(b + 1);
                }
            }
        }
    }
    let stem = dims("conv1.weight").ok_or_else(|| ImportError::NoEncoder { detail: "no conv1.weight".into() })?;
    if stem.len() != 4 {
        return Err(ImportError::NoEncoder { detail: format!("conv1.weight has shape {stem:?}, not 4-D") });
    }
    let bottleneck = encoder.contains_key("layer1.0.conv3.weight");
    let base = if bottleneck { dims("layer1.0.conv1.weight").map(|d| d[0]).unwrap_or(0) } else { stem[0] };
    let arch = match (blocks, bottleneck) {
        ([1, 1, 1, 1], false) if base == 2 => "tiny",
        ([2, 2, 2, 2], false) => "resnet18",
        ([3, 4, 6, 3], false) => "resnet34",
        ([3, 4, 6, 3], true) => "resnet50",
        ([3, 4, 23, 3], true) => "resnet101",
        ([3, 8, 36, 3], true) => "resnet152",
        _ => {
            return Err(ImportError::Unsupported {
                detail: format!(
                    "a ResNet with {blocks:?} blocks per stage ({}) is none of ResNet-18/34/50/101/152",
                    if bottleneck { "bottleneck" } else { "basic" }
                ),
            })
        }
    };
    let width = if arch == "tiny" { 1 } else { base / 64 };
    if arch != "tiny" && (base % 64 != 0 || width == 0) {
        return Err(ImportError::Unsupported {
            detail: format!("stage 1 has {base} channels: not a multiple of 64, so no SimCLR width multiplier"),
        });
    }
    let variant = simclr_common::pretrain::Variant::Torchvision;
    Ok(Shape { arch, width, in_channels: stem[1], blocks, bottleneck, variant })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::torch_file::DType;

    fn t(shape: &[usize]) -> RawTensor {
        RawTensor { dtype: DType::F32, shape: shape.to_vec(), data: vec![0; 4 * shape.iter().product::<usize>()] }
    }

    fn resnet18_keys(prefix: &str) -> BTreeMap<String, RawTensor> {
        let mut m = BTreeMap::new();
        m.insert(format!("{prefix}conv1.weight"), t(&[64, 3, 7, 7]));
        for s in BN_SUFFIXES {
            m.insert(format!("{prefix}bn1.{s}"), t(&[64]));
        }
        for l in 1..=4 {
            for b in 0..2 {
                m.insert(format!("{prefix}layer{l}.{b}.conv1.weight"), t(&[64 << (l - 1), 64, 3, 3]));
                m.insert(format!("{prefix}layer{l}.{b}.bn1.weight"), t(&[64 << (l - 1)]));
            }
        }
        m
    }

    #[test]
    fn names_map_to_torchvisions_for_each_layout() {
        assert_eq!(
            torchvision_name("layer2.0.downsample.1.running_var", false).as_deref(),
            Some("layer2.0.downsample.1.running_var")
        );
        assert_eq!(torchvision_name("fc.weight", false).as_deref(), Some("fc.weight"));
        assert_eq!(torchvision_name("projector.0.weight", false), None);
        assert_eq!(torchvision_name("layer5.0.conv1.weight", false), None);
        assert_eq!(torchvision_name("0.weight", true).as_deref(), Some("conv1.weight"));
        assert_eq!(torchvision_name("1.running_mean", true).as_deref(), Some("bn1.running_mean"));
        assert_eq!(torchvision_name("7.1.downsample.0.weight", true).as_deref(), Some("layer4.1.downsample.0.weight"));
        assert_eq!(torchvision_name("8.weight", true), None);
    }

    #[test]
    fn the_encoder_is_found_under_any_prefix_and_ambiguity_is_named() {
        let plain = resnet18_keys("");
        assert_eq!(choose(&plain, None, &[]).unwrap(), Found { prefix: String::new(), sequential: false });
        let mut solo = resnet18_keys("state_dict.backbone.");
        solo.extend(resnet18_keys("state_dict.momentum_backbone."));
        solo.insert("state_dict.projector.0.weight".into(), t(&[8, 512]));
        let err = choose(&solo, None, &[]).unwrap_err().to_string();
        assert!(err.contains("'state_dict.backbone.'") && err.contains("--prefix"), "{err}");
        assert_eq!(choose(&solo, None, &[".backbone."]).unwrap().prefix, "state_dict.backbone.");
        assert_eq!(
            choose(&solo, Some("state_dict.momentum_backbone."), &[]).unwrap().prefix,
            "state_dict.momentum_backbone."
        );
        let err = choose(&solo, Some("model."), &[]).unwrap_err().to_string();
        assert!(err.contains("'model.'") && err.contains("state_dict.backbone."), "{err}");
        let found = choose(&solo, None, &[".backbone."]).unwrap();
        let (enc, left) = rename(solo, &found);
        assert!(enc.contains_key("layer4.1.conv1.weight") && left.is_empty());
        let err = choose(&BTreeMap::new(), None, &[]).unwrap_err().to_string();
        assert!(err.contains("conv1.weight"), "{err}");
    }

    #[test]
    fn architecture_and_width_come_from_shapes() {
        let shape = infer_shape(&resnet18_keys("")).unwrap();
        assert_eq!((shape.arch, shape.width, shape.in_channels), ("resnet18", 1, 3));
        let mut odd = resnet18_keys("");
        odd.insert("layer3.2.conv1.weight".into(), t(&[256, 256, 3, 3]));
        let err = infer_shape(&odd).unwrap_err().to_string();
        assert!(err.contains("[2, 2, 3, 2]"), "{err}");
    }
}
