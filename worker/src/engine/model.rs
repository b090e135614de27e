//! The encoder f (ResNet-18/34/50/101/152 with SimCLR's width multiplier, and a tiny variant for tests) and
//! the projection head g.
//!
//! Parameter names are torchvision's `state_dict` names (`conv1.weight`, `layer2.0.downsample.1.
//! running_mean`, ...), so the saved encoder loads into `torchvision.models.resnet50()` with
//! `strict=True` once its classifier (`fc`) is dropped, and torchvision-format weights load into ours.
//! Architecture as torchvision's: a 7x7/2 stem and 3x3/2 max pool, BasicBlocks (18, 34) or ResNet v1.5
//! Bottlenecks (50: the stride on the 3x3 convolution), a 1x1 convolution and BatchNorm on the shortcut
//! where the shape changes, global average pooling. The width multiplier scales every layer's
//! channels, as SimCLR's ResNet-50 (2x) and (4x) do; torchvision's own classes exist only at 1x.
//! Initialisation is torchvision's too: Kaiming normal (fan out) convolutions, BatchNorm weight 1 and
//! bias 0.
//!
//! `pretrain.variant` selects google-research/simclr's TensorFlow layouts instead, so that its published
//! encoders give the features they give in TensorFlow: `simclr_tf` pads the stem's max pool as
//! TensorFlow's `SAME` does (bottom and right, not all round); `simclr_tf_sk` is SimCLR v2's
//! selective-kernel ResNet (a 3x3 stem of three convolutions, named as timm's deep stem `conv1.0/1/3/4/6`;
//! each 3x3 convolution doubled into two streams mixed by a softmax from their pooled sum, `sk.*`;
//! ResNet-D shortcuts, a 2x2 average pool before a stride-1 projection, `downsample.1/2`).
//!
//! Grayscale radiographs come in as N x 1 x H x W and are repeated to 3 channels at the model input
//! (as the reference experiment did), or meet a native 1-channel stem.

use std::cell::Cell;

use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

use crate::engine::numerics::{channels_last, is_channels_last, to_float, Numerics};

pub use simclr_common::pretrain::{Arch, InputNormalisation, Stem, Variant};

/// ImageNet's per-channel statistics (torchvision's `transforms.Normalize` values).
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn blocks(arch: Arch) -> [i64; 4] {
    match arch {
        Arch::Resnet18 => [2, 2, 2, 2],
        Arch::Resnet34 | Arch::Resnet50 => [3, 4, 6, 3],
        Arch::Resnet101 => [3, 4, 23, 3],
        Arch::Resnet152 => [3, 8, 36, 3],
        Arch::Tiny | Arch::TinyBottleneck => [1, 1, 1, 1],
    }
}

/// SimCLR v2's selective kernels: the mixing layer's width is `filters * SK_RATIO`, at least `SK_MIN_DIM`.
const SK_RATIO: f64 = 0.0625;
const SK_MIN_DIM: i64 = 32;

fn base_channels(arch: Arch) -> i64 {
    if matches!(arch, Arch::Tiny | Arch::TinyBottleneck) {
        2
    } else {
        64
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderConfig {
    pub arch: Arch,
    /// 1 to 4, as SimCLR's ResNet-50 (1x), (2x), (4x) and SimCLR v2's (3x).
    pub width: i64,
    pub stem: Stem,
    pub normalisation: InputNormalisation,
    pub variant: Variant,
}

impl EncoderConfig {
    pub fn new(arch: Arch, width: i64, stem: Stem) -> EncoderConfig {
        EncoderConfig { arch, width, stem, normalisation: InputNormalisation::None, variant: Variant::Torchvision }
    }

    /// The job's encoder (`pretrain.arch`, `width`, `stem`, `variant`, `input_normalisation`).
    pub fn of(section: &simclr_common::pretrain::PretrainSection) -> EncoderConfig {
        EncoderConfig {
            arch: section.arch,
            width: section.width,
            stem: section.stem,
            normalisation: section.input_normalisation,
            variant: section.variant,
        }
    }

    pub fn tiny() -> EncoderConfig {
        EncoderConfig::new(Arch::Tiny, 1, Stem::Repeat3)
    }
}

fn bn(p: nn::Path, channels: i64) -> nn::BatchNorm {
    // torchvision's defaults: eps 1e-5, momentum 0.1, weight 1, bias 0.
    nn::batch_norm2d(
        p,
        channels,
        nn::BatchNormConfig { ws_init: nn::Init::Const(1.0), bs_init: nn::Init::Const(0.0), ..Default::default() },
    )
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let ws_init = nn::Init::Kaiming {
        dist: nn::init::NormalOrUniform::Normal,
        fan: nn::init::FanInOut::FanOut,
        non_linearity: nn::init::NonLinearity::ReLU,
    };
    nn::conv2d(p, cin, cout, k, nn::ConvConfig { stride, padding, bias: false, ws_init, ..Default::default() })
}

/// SimCLR v2's selective-kernel mixing: the two streams' pooled sum -> 1x1 convolution, BatchNorm,
/// ReLU -> 1x1 convolution to two logits per channel, a softmax over the streams.
#[derive(Debug)]
struct Selective {
    reduce: nn::Conv2D,
    bn: nn::BatchNorm,
    expand: nn::Conv2D,
}

#[derive(Debug)]
struct Shortcut {
    /// ResNet-D: a 2x2 average pool (with this stride) before the 1x1 projection.
    avg_pool: Option<i64>,
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

#[derive(Debug)]
struct Block {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    /// With selective kernels: the mixing of the second convolution's two streams.
    selective: Option<Selective>,
    downsample: Option<Shortcut>,
}

impl Block {
    fn new(p: &nn::Path, cin: i64, planes: i64, stride: i64, arch: Arch, variant: Variant) -> (Block, i64) {
        let sk = variant == Variant::SimclrTfSk;
        let (convs, cout) = if arch.bottleneck() {
            let cout = planes * 4;
            let streams = if sk { 2 } else { 1 };
            let convs = vec![
                (conv(p / "conv1", cin, planes, 1, 1, 0), bn(p / "bn1", planes)),
                (conv(p / "conv2", planes, streams * planes, 3, stride, 1), bn(p / "bn2", streams * planes)),
                (conv(p / "conv3", planes, cout, 1, 1, 0), bn(p / "bn3", cout)),
            ];
            (convs, cout)
        } else {
            let convs = vec![
                (conv(p / "conv1", cin, planes, 3, stride, 1), bn(p / "bn1", planes)),
                (conv(p / "conv2", planes, planes, 3, 1, 1), bn(p / "bn2", planes)),
            ];
            (convs, planes)
        };
        let selective = sk.then(|| {
            let mid = ((planes as f64 * SK_RATIO) as i64).max(SK_MIN_DIM);
            Selective {
                reduce: conv(p / "sk" / "reduce", planes, mid, 1, 1, 0),
                bn: bn(p / "sk" / "bn", mid),
                expand: conv(p / "sk" / "expand", mid, 2 * planes, 1, 1, 0),
            }
        });
        // SimCLR's TensorFlow nets project the shortcut of every stage's first block (even where the
        // shape stays, which only a bottleneck's first stage has; torchvision's does the same there).
        let downsample = (stride != 1 || cin != cout).then(|| {
            if sk {
                Shortcut {
                    avg_pool: Some(stride),
                    conv: conv(p / "downsample" / 1, cin, cout, 1, 1, 0),
                    bn: bn(p / "downsample" / 2, cout),
                }
            } else {
                Shortcut {
                    avg_pool: None,
                    conv: conv(p / "downsample" / 0, cin, cout, 1, stride, 0),
                    bn: bn(p / "downsample" / 1, cout),
                }
            }
        });
        (Block { convs, selective, downsample }, cout)
    }

    fn forward(&self, x: &Tensor, pass: &mut dyn NormPass) -> Tensor {
        let last = self.convs.len() - 1;
        // ReLU and the residual sum in place, as torchvision does (less memory traffic; autograd allows
        // it: BatchNorm's backward does not need its output).
        let mut y = x.shallow_clone();
        for (i, (c, b)) in self.convs.iter().enumerate() {
            y = pass.norm(b, &y.apply(c));
            if i < last {
                y = y.relu_();
            }
            if i == 1 {
                if let Some(sk) = &self.selective {
                    y = sk.mix(&y, pass);
                }
            }
        }
        let shortcut = match &self.downsample {
            Some(s) => {
                let pooled = match s.avg_pool {
                    Some(stride) => tf_avg_pool2(x, stride),
                    None => x.shallow_clone(),
                };
                pass.norm(&s.bn, &pooled.apply(&s.conv))
            }
            None => x.shallow_clone(),
        };
        pass.cut(y.g_add_(&shortcut).relu_())
    }
}

impl Selective {
    /// `streams`: N x 2C x H x W, the two streams stacked along the channels.
    fn mix(&self, streams: &Tensor, pass: &mut dyn NormPass) -> Tensor {
        let size = streams.size();
        let (n, c) = (size[0], size[1] / 2);
        let pair = streams.view([n, 2, c, size[2], size[3]]);
        let pooled = pair.sum_dim_intlist(1, false, None).mean_dim(&[2i64, 3][..], true, None);
        let hidden = pass.norm(&self.bn, &pooled.apply(&self.reduce)).relu();
        let weights = hidden.apply(&self.expand).view([n, 2, c, 1, 1]).softmax(1, None);
        (pair * weights).sum_dim_intlist(1, false, None)
    }
}

/// TensorFlow's 2x2 average pool of SimCLR v2's ResNet-D shortcut: with stride 2, the input padded by
/// one zero row and column at the bottom and right, then `VALID`; with stride 1, `SAME` (the same
/// padding, but a window's mean is over its elements inside the input only).
fn tf_avg_pool2(x: &Tensor, stride: i64) -> Tensor {
    let padded = x.constant_pad_nd([0, 1, 0, 1]);
    let pooled = padded.avg_pool2d([2, 2], [stride, stride], [0, 0], false, true, None);
    if stride > 1 {
        return pooled;
    }
    let size = x.size();
    let ones = Tensor::ones([1, 1, size[2], size[3]], (x.kind(), x.device())).constant_pad_nd([0, 1, 0, 1]);
    pooled / ones.avg_pool2d([2, 2], [1, 1], [0, 0], false, true, None)
}

/// TensorFlow's 3x3/2 max pool with `SAME` padding: the padding a stride-2 window needs, the larger
/// half at the bottom and right (torchvision pads one on every side: on an even input, the windows
/// sit one pixel further up and left).
fn tf_max_pool3(x: &Tensor) -> Tensor {
    let size = x.size();
    let pad = |n: i64| {
        let total = (((n + 1) / 2 - 1) * 2 + 3 - n).max(0);
        (total / 2, total - total / 2)
    };
    let (top, bottom) = pad(size[2]);
    let (left, right) = pad(size[3]);
    let padded = x.pad([left, right, top, bottom], "constant", f64::NEG_INFINITY);
    padded.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// The first layers: torchvision's 7x7/2 convolution, or SimCLR v2's three 3x3 convolutions.
#[derive(Debug)]
enum StemLayers {
    Single(nn::Conv2D),
    /// (3x3/2, BatchNorm), (3x3, BatchNorm), 3x3; `bn1` follows.
    Deep(Box<[(nn::Conv2D, nn::BatchNorm); 2]>, nn::Conv2D),
}

/// How the BatchNorm layers of one forward pass compute their statistics.
pub trait NormPass {
    fn train(&self) -> bool;
    fn norm(&mut self, bn: &nn::BatchNorm, x: &Tensor) -> Tensor;
    /// A tensor every later computation depends on through it alone (a residual block's output): a
    /// place where a pass that splits the backward may cut the graph. The identity otherwise.
    fn cut(&mut self, x: Tensor) -> Tensor {
        x
    }
}

/// Each process's own batch statistics in training, running statistics in evaluation: plain BatchNorm.
pub struct LocalNorm {
    pub train: bool,
}

impl NormPass for LocalNorm {
    fn train(&self) -> bool {
        self.train
    }
    fn norm(&mut self, bn: &nn::BatchNorm, x: &Tensor) -> Tensor {
        bn.forward_t(x, self.train)
    }
}

/// The encoder f: images N x 1 x H x W in [0, 1] -> features h, N x `feature_dim`.
#[derive(Debug)]
pub struct Encoder {
    pub config: EncoderConfig,
    conv1: StemLayers,
    bn1: nn::BatchNorm,
    layers: Vec<Vec<Block>>,
    pub feature_dim: i64,
    /// Training-mode forward passes, saved as BatchNorm's `num_batches_tracked` (torchvision has it).
    batches_tracked: Cell<i64>,
    bn_prefixes: Vec<String>,
    /// Precision and layout of the forward pass (`pretrain.precision`, `pretrain.channels_last`);
    /// unset: float32, contiguous.
    numerics: Cell<Option<Numerics>>,
}

impl Encoder {
    /// Builds the encoder under `p`; with the VarStore's root as `p`, names are torchvision's.
    pub fn new(p: &nn::Path, config: EncoderConfig) -> Encoder {
        assert!(matches!(config.width, 1..=4), "width multiplier 1, 2, 3 or 4");
        let base = base_channels(config.arch) * config.width;
        let cin = if config.stem == Stem::Repeat3 { 3 } else { 1 };
        let mut bn_prefixes = vec!["bn1".to_string()];
        let conv1 = if config.variant == Variant::SimclrTfSk {
            let stem = p / "conv1";
            bn_prefixes.extend(["conv1.1".to_string(), "conv1.4".to_string()]);
            StemLayers::Deep(
                Box::new([
                    (conv(&stem / 0, cin, base / 2, 3, 2, 1), bn(&stem / 1, base / 2)),
                    (conv(&stem / 3, base / 2, base / 2, 3, 1, 1), bn(&stem / 4, base / 2)),
                ]),
                conv(&stem / 6, base / 2, base, 3, 1, 1),
            )
        } else {
            StemLayers::Single(conv(p / "conv1", cin, base, 7, 2, 3))
        };
        let bn1 = bn(p / "bn1", base);
        let mut channels = base;
        let mut layers = Vec::new();
        for (stage, &n) in blocks(config.arch).iter().enumerate() {
            let planes = base << stage;
            let stride = if stage == 0 { 1 } else { 2 };
            let layer = p / format!("layer{}", stage + 1);
            let mut blocks = Vec::new();
            for i in 0..n {
                let (block, cout) = Block::new(
                    &(&layer / i),
                    channels,
                    planes,
                    if i == 0 { stride } else { 1 },
                    config.arch,
                    config.variant,
                );
                let prefix = format!("layer{}.{i}", stage + 1);
                for k in 1..=block.convs.len() {
                    bn_prefixes.push(format!("{prefix}.bn{k}"));
                }
                if block.selective.is_some() {
                    bn_prefixes.push(format!("{prefix}.sk.bn"));
                }
                if let Some(s) = &block.downsample {
                    bn_prefixes.push(format!("{prefix}.downsample.{}", if s.avg_pool.is_some() { 2 } else { 1 }));
                }
                blocks.push(block);
                channels = cout;
            }
            layers.push(blocks);
        }
        Encoder {
            config,
            conv1,
            bn1,
            layers,
            feature_dim: channels,
            batches_tracked: Cell::new(0),
            bn_prefixes,
            numerics: Cell::new(None),
        }
    }

    pub fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        self.forward_with(images, &mut LocalNorm { train })
    }

    /// The features h (float32, whatever the precision of the pass).
    pub fn forward_with(&self, images: &Tensor, pass: &mut dyn NormPass) -> Tensor {
        let mut x = if self.config.stem == Stem::Repeat3 && images.size()[1] == 1 {
            images.repeat([1, 3, 1, 1])
        } else {
            images.shallow_clone()
        };
        if self.config.normalisation == InputNormalisation::Imagenet {
            let (kind, device) = (x.kind(), x.device());
            let stat = |v: &[f32; 3]| Tensor::from_slice(v).to_kind(kind).to_device(device).view([1, 3, 1, 1]);
            x = (x - stat(&IMAGENET_MEAN)) / stat(&IMAGENET_STD);
        }
        if pass.train() {
            self.batches_tracked.set(self.batches_tracked.get() + 1);
        }
        let numerics = self.numerics.get();
        let forward = |x: Tensor, pass: &mut dyn NormPass| {
            let x = match &self.conv1 {
                StemLayers::Single(c) => x.apply(c),
                StemLayers::Deep(layers, last) => {
                    let mut x = x;
                    for (c, b) in layers.iter() {
                        x = pass.norm(b, &x.apply(c)).relu_();
                    }
                    x.apply(last)
                }
            };
            let x = pass.norm(&self.bn1, &x).relu_();
            let x = match self.config.variant {
                Variant::Torchvision => x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false),
                Variant::SimclrTf | Variant::SimclrTfSk => tf_max_pool3(&x),
            };
            let mut x = pass.cut(x);
            for layer in &self.layers {
                for block in layer {
                    x = block.forward(&x, pass);
                }
            }
            x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
        };
        match numerics {
            None => forward(x, pass),
            Some(n) => to_float(n.autocast(|| forward(n.layout(&x), pass))),
        }
    }

    /// Sets the precision and layout of later forward passes. With channels-last, the convolution
    /// weights (every 4-dimensional variable of `vs`, which must hold this encoder) move to that
    /// layout too, keeping their values.
    pub fn set_numerics(&self, vs: &nn::VarStore, numerics: Numerics) {
        if numerics.channels_last {
            tch::no_grad(|| {
                for (_, mut t) in vs.variables() {
                    if t.dim() == 4 && !is_channels_last(&t) {
                        let moved = channels_last(&t);
                        t.set_data(&moved);
                    }
                }
            });
        }
        self.numerics.set(Some(numerics));
    }

    /// BatchNorm modules' `num_batches_tracked` entries, as torchvision's `state_dict` has them.
    pub fn batches_tracked_entries(&self) -> Vec<(String, Tensor)> {
        let n = self.batches_tracked.get();
        self.bn_prefixes.iter().map(|p| (format!("{p}.num_batches_tracked"), Tensor::from(n))).collect()
    }

    pub fn set_batches_tracked(&self, n: i64) {
        self.batches_tracked.set(n);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadConfig {
    /// Linear layers: 2 as SimCLR v1, 3 as v2.
    pub layers: usize,
    /// Width of the hidden layers (SimCLR: the encoder's feature width).
    pub hidden: i64,
    pub out: i64,
    /// BatchNorm after every hidden linear layer (SimCLR v2).
    pub batch_norm: bool,
}

/// The projection head g: h -> z. Its variables live under `projection_head.` and are dropped after
/// pretraining.
#[derive(Debug)]
pub struct ProjectionHead {
    layers: Vec<(nn::Linear, Option<nn::BatchNorm>)>,
}

pub const HEAD_PREFIX: &str = "projection_head";

impl ProjectionHead {
    pub fn new(p: &nn::Path, input: i64, config: HeadConfig) -> ProjectionHead {
        assert!(config.layers >= 1, "a projection head has at least one layer");
        let mut layers = Vec::new();
        let mut width = input;
        for i in 0..config.layers {
            let last = i + 1 == config.layers;
            let out = if last { config.out } else { config.hidden };
            let layer_path = p / i;
            let linear = nn::linear(
                &layer_path / "linear",
                width,
                out,
                nn::LinearConfig { bias: !config.batch_norm || last, ..Default::default() },
            );
            let norm = (config.batch_norm && !last).then(|| {
                nn::batch_norm1d(
                    &layer_path / "bn",
                    out,
                    nn::BatchNormConfig {
                        ws_init: nn::Init::Const(1.0),
                        bs_init: nn::Init::Const(0.0),
                        ..Default::default()
                    },
                )
            });
            layers.push((linear, norm));
            width = out;
        }
        ProjectionHead { layers }
    }

    pub fn forward(&self, h: &Tensor, train: bool) -> Tensor {
        self.forward_with(h, &mut LocalNorm { train })
    }

    pub fn forward_with(&self, h: &Tensor, pass: &mut dyn NormPass) -> Tensor {
        let last = self.layers.len() - 1;
        let mut x = h.shallow_clone();
        for (i, (linear, norm)) in self.layers.iter().enumerate() {
            x = x.apply(linear);
            if let Some(norm) = norm {
                x = pass.norm(norm, &x);
            }
            if i < last {
                x = x.relu();
            }
        }
        x
    }
}

/// A var store on `device` whose variables `build` creates: drawn on the CPU, then moved, so that under
/// [`with_torch_seed`] the same seed gives the same initial weights on any device (libtorch's CUDA
/// generator draws other numbers than its CPU one).
pub fn var_store_drawn_on_cpu<T>(device: tch::Device, build: impl FnOnce(&nn::Path) -> T) -> (nn::VarStore, T) {
    let mut vs = nn::VarStore::new(tch::Device::Cpu);
    let built = build(&vs.root());
    vs.set_device(device);
    (vs, built)
}

/// Runs `f` with libtorch's global generator seeded with `seed`, holding a process-wide lock, so that
/// weights initialised (or tensors drawn) inside are a function of the seed even while other threads
/// draw too (tests run in parallel; so could several trainers).
pub fn with_torch_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = TORCH_RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed as i64);
    f()
}

/// The number of elements of every trainable variable in `vs` whose name starts with `prefix`.
pub fn parameter_count(vs: &nn::VarStore, prefix: &str) -> i64 {
    vs.variables()
        .iter()
        .filter(|(name, t)| name.starts_with(prefix) && t.requires_grad())
        .map(|(_, t)| t.numel() as i64)
        .sum()
}

/// The encoder's weights by torchvision name: every variable of `vs` outside the projection head, plus
/// BatchNorm's `num_batches_tracked`, sorted by name.
pub fn encoder_state(vs: &nn::VarStore, encoder: &Encoder) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(name, _)| !name.starts_with(HEAD_PREFIX))
        .map(|(name, t)| (name, t.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous()))
        .collect();
    out.extend(encoder.batches_tracked_entries());
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Writes the encoder as safetensors with torchvision's names, atomically (`simclr_common::atomic_file`).
pub fn save_encoder(vs: &nn::VarStore, encoder: &Encoder, path: &std::path::Path) -> Result<(), String> {
    let state = encoder_state(vs, encoder);
    simclr_common::atomic_file::write_atomic(path, |tmp| {
        Tensor::write_safetensors(&state, tmp).map_err(|e| std::io::Error::other(e.to_string()))
    })
    .map_err(|e| e.to_string())
}

/// Loads torchvision-format encoder weights (`--init-weights`): every encoder variable must be in the
/// file with its shape; a classifier (`fc.*`) is ignored; anything else unknown is an error, as in
/// PyTorch's `strict=True`.
pub fn load_encoder(vs: &mut nn::VarStore, encoder: &Encoder, path: &std::path::Path) -> Result<(), String> {
    check_metadata(&encoder.config, &encoder_file_metadata(path)?).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = Tensor::read_safetensors(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut ours = vs.variables();
    ours.retain(|name, _| !name.starts_with(HEAD_PREFIX));
    let mut seen = std::collections::BTreeSet::new();
    let mut tracked = 0;
    let _guard = tch::no_grad_guard();
    for (name, value) in &file {
        if name.starts_with("fc.") {
            continue;
        }
        if name.ends_with(".num_batches_tracked") {
            tracked = tracked.max(value.int64_value(&[]));
            continue;
        }
        let Some(target) = ours.get_mut(name) else {
            return Err(format!("{}: unexpected key '{name}' (not a parameter of this encoder)", path.display()));
        };
        if target.size() != value.size() {
            return Err(format!(
                "{}: '{name}' has shape {:?}, this encoder's is {:?} (another architecture, width or stem?)",
                path.display(),
                value.size(),
                target.size()
            ));
        }
        target.copy_(&value.to_kind(target.kind()).to_device(target.device()));
        seen.insert(name.clone());
    }
    let missing: Vec<&String> = ours.keys().filter(|k| !seen.contains(*k)).collect();
    if !missing.is_empty() {
        return Err(format!(
            "{}: missing {} keys, for example {:?}",
            path.display(),
            missing.len(),
            &missing[..missing.len().min(3)]
        ));
    }
    encoder.set_batches_tracked(tracked);
    Ok(())
}

/// The metadata an encoder file carries (`import-weights` writes the architecture, width, stem and
/// input normalisation it found; tch's own writer leaves it empty). Reads only the safetensors header.
pub fn encoder_file_metadata(path: &std::path::Path) -> Result<std::collections::BTreeMap<String, String>, String> {
    use std::io::Read;
    let fail = |e: String| format!("cannot read {}: {e}", path.display());
    let mut file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| fail(format!("not safetensors ({e})")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(fail(format!("not safetensors (a header of {len} bytes)")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| fail(format!("truncated safetensors header ({e})")))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| fail(format!("not safetensors ({e})")))?;
    let mut out = std::collections::BTreeMap::new();
    if let Some(fields) = header.get("__metadata__").and_then(|m| m.as_object()) {
        for (k, v) in fields {
            out.insert(k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
        }
    }
    Ok(out)
}

/// Refuses a file whose recorded architecture, width, stem or input normalisation is not the job's,
/// naming the key to set.
fn check_metadata(config: &EncoderConfig, meta: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
    let name = |v: serde_json::Value| v.as_str().map(str::to_string).unwrap_or_default();
    let ours = [
        ("arch", "pretrain.arch", name(serde_json::json!(config.arch))),
        ("width", "pretrain.width", config.width.to_string()),
        ("stem", "pretrain.stem", name(serde_json::json!(config.stem))),
        ("variant", "pretrain.variant", config.variant.name().to_string()),
        ("input_normalisation", "pretrain.input_normalisation", config.normalisation.name().to_string()),
    ];
    let source = meta.get("source_format").map(|f| format!(" (imported from {f})")).unwrap_or_default();
    for (field, key, value) in ours {
        if let Some(theirs) = meta.get(field) {
            if *theirs != value {
                let quoted = if field == "width" { theirs.clone() } else { format!("\"{theirs}\"") };
                return Err(format!(
                    "the file's encoder has {field} {theirs}{source}, this job's {value}: set {key} = {quoted}"
                ));
            }
        }
    }
    let sk = config.variant == Variant::SimclrTfSk;
    if meta.get("selective_kernels").is_some_and(|v| (v == "true") != sk) {
        return Err(if sk {
            format!("the file's encoder has no selective kernels{source}; set pretrain.variant to the file's layout")
        } else {
            format!("the file's encoder has selective kernels{source}: set pretrain.variant = \"simclr_tf_sk\"")
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn build(config: EncoderConfig) -> (nn::VarStore, Encoder) {
        with_torch_seed(0, || {
            let vs = nn::VarStore::new(Device::Cpu);
            let encoder = Encoder::new(&vs.root(), config);
            (vs, encoder)
        })
    }

    #[test]
    fn feature_widths_and_parameter_counts_are_torchvisions() {
        // torchvision: resnet18 11,689,512 parameters with fc (512 x 1000 + 1000), resnet50 25,557,032
        // (2048 x 1000 + 1000), resnet34 21,797,672, resnet101 44,549,160.
        for (arch, features, with_fc) in [
            (Arch::Resnet18, 512, 11_689_512),
            (Arch::Resnet34, 512, 21_797_672),
            (Arch::Resnet50, 2048, 25_557_032),
            (Arch::Resnet101, 2048, 44_549_160),
        ] {
            let (vs, encoder) = build(EncoderConfig::new(arch, 1, Stem::Repeat3));
            assert_eq!(encoder.feature_dim, features, "{arch:?}");
            assert_eq!(parameter_count(&vs, ""), with_fc - (features * 1000 + 1000), "{arch:?}");
        }
        // SimCLR's ResNet-50 (2x): 94 M parameters without the classifier (the paper's table: 94 M).
        let (vs, encoder) = build(EncoderConfig::new(Arch::Resnet50, 2, Stem::Repeat3));
        assert_eq!(encoder.feature_dim, 4096);
        let count = parameter_count(&vs, "");
        assert!((93_000_000..95_000_000).contains(&count), "{count}");
        let (vs, encoder) = build(EncoderConfig::tiny());
        let count = parameter_count(&vs, "");
        assert!((2_000..10_000).contains(&count), "tiny: {count}");
        assert_eq!(encoder.feature_dim, 16);
    }

    #[test]
    fn names_follow_torchvision() {
        let (vs, encoder) = build(EncoderConfig::new(Arch::Resnet50, 1, Stem::Repeat3));
        let state = encoder_state(&vs, &encoder);
        let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
        for expected in [
            "conv1.weight",
            "bn1.running_var",
            "bn1.num_batches_tracked",
            "layer1.0.conv3.weight",
            "layer1.0.downsample.0.weight",
            "layer1.0.downsample.1.bias",
            "layer4.2.bn3.num_batches_tracked",
        ] {
            assert!(names.contains(&expected), "{expected} missing");
        }
        // torchvision's resnet50 state_dict has 320 entries, 2 of them the classifier's.
        assert_eq!(state.len(), 318);
        assert!(!names.iter().any(|n| n.starts_with("layer1.1.downsample")));
    }

    #[test]
    fn imagenet_normalisation_is_torchvisions_normalize_on_the_repeated_image() {
        // torchvision: Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]) on the
        // 3-channel image, then the network.
        let (_, plain) = build(EncoderConfig::tiny());
        let (_, normed) = build(EncoderConfig { normalisation: InputNormalisation::Imagenet, ..EncoderConfig::tiny() });
        let gray = Tensor::rand([2, 1, 32, 32], (Kind::Float, Device::Cpu));
        let rgb = gray.repeat([1, 3, 1, 1]);
        let mean = Tensor::from_slice(&[0.485f32, 0.456, 0.406]).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&[0.229f32, 0.224, 0.225]).view([1, 3, 1, 1]);
        let expected = plain.forward(&((rgb - mean) / std), false);
        let got = normed.forward(&gray, false);
        assert!(got.allclose(&expected, 1e-5, 1e-6, false));
        assert!(!got.allclose(&plain.forward(&gray, false), 1e-3, 1e-3, false));
    }

    #[test]
    fn a_file_recording_another_encoder_is_refused_naming_the_key() {
        let meta = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let tiny = EncoderConfig::tiny();
        assert!(check_metadata(&tiny, &meta(&[])).is_ok(), "no metadata (tch's writer): nothing to check");
        let ok = meta(&[("arch", "tiny"), ("width", "1"), ("stem", "repeat3"), ("input_normalisation", "none")]);
        assert!(check_metadata(&tiny, &ok).is_ok());
        let e = check_metadata(&tiny, &meta(&[("arch", "resnet50"), ("source_format", "solo-learn")])).unwrap_err();
        assert!(e.contains("set pretrain.arch = \"resnet50\"") && e.contains("imported from solo-learn"), "{e}");
        let e = check_metadata(&tiny, &meta(&[("width", "2")])).unwrap_err();
        assert!(e.contains("set pretrain.width = 2"), "{e}");
        let e = check_metadata(&tiny, &meta(&[("input_normalisation", "imagenet")])).unwrap_err();
        assert!(e.contains("set pretrain.input_normalisation = \"imagenet\""), "{e}");
        let e = check_metadata(&tiny, &meta(&[("selective_kernels", "true")])).unwrap_err();
        assert!(e.contains("selective kernels"), "{e}");
    }

    #[test]
    fn shapes_through_the_encoder_and_head() {
        let (vs, encoder) = build(EncoderConfig::tiny());
        let head = ProjectionHead::new(
            &(vs.root() / HEAD_PREFIX),
            encoder.feature_dim,
            HeadConfig { layers: 3, hidden: 16, out: 8, batch_norm: true },
        );
        let images = Tensor::rand([5, 1, 32, 32], (Kind::Float, Device::Cpu));
        let h = encoder.forward(&images, true);
        assert_eq!(h.size(), [5, 16]);
        assert_eq!(head.forward(&h, true).size(), [5, 8]);
        // The head is not part of the encoder's state.
        assert!(encoder_state(&vs, &encoder).iter().all(|(n, _)| !n.starts_with(HEAD_PREFIX)));
        assert!(parameter_count(&vs, HEAD_PREFIX) > 0);
        // The native stem takes the single channel as it is.
        let (_, native) = build(EncoderConfig { stem: Stem::Native1, ..EncoderConfig::tiny() });
        assert_eq!(native.forward(&images, false).size(), [5, 16]);
    }

    #[test]
    fn saved_weights_load_back_and_strictness_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("encoder.safetensors");
        let (vs, encoder) = build(EncoderConfig::tiny());
        let images = Tensor::rand([3, 1, 32, 32], (Kind::Float, Device::Cpu));
        let _ = encoder.forward(&images, true); // moves the running statistics
        save_encoder(&vs, &encoder, &path).unwrap();
        let want = encoder.forward(&images, false);

        let (mut vs2, encoder2) = with_torch_seed(99, || {
            let vs = nn::VarStore::new(Device::Cpu);
            let encoder = Encoder::new(&vs.root(), EncoderConfig::tiny());
            (vs, encoder)
        });
        assert!(!encoder2.forward(&images, false).allclose(&want, 1e-6, 1e-6, false));
        load_encoder(&mut vs2, &encoder2, &path).unwrap();
        assert!(encoder2.forward(&images, false).allclose(&want, 0.0, 0.0, false));
        assert_eq!(encoder2.batches_tracked_entries()[0].1.int64_value(&[]), 1);

        // Another width does not load, and says which key differs.
        let mut vs3 = nn::VarStore::new(Device::Cpu);
        let wide = Encoder::new(&vs3.root(), EncoderConfig { width: 2, ..EncoderConfig::tiny() });
        let err = load_encoder(&mut vs3, &wide, &path).unwrap_err();
        assert!(err.contains("has shape") && err.contains("encoder.safetensors"), "{err}");
    }
}
