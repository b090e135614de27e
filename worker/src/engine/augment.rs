//! SimCLR's augmentations adapted to grayscale radiographs, batched on tensors.
//!
//! Per view, in this order: random resized crop (area scale and aspect ratio ranges) combined with a
//! horizontal flip and a small rotation into one affine resampling (bilinear, zero outside the image),
//! to the model's input size; brightness and contrast jitter with strength s (probability p, the two in
//! random order, each clamped to [0, 1], as torchvision's ColorJitter); gamma; Gaussian blur (kernel 10%
//! of the side, sigma uniform in a range, probability p). No hue or saturation: the images have one
//! channel.
//!
//! Every random choice comes from (seed, sample id, epoch, view) alone, so a sample gets the same views
//! whatever the number of workers, its batch or the thread count; the parameters are drawn on the CPU
//! and applied to the whole batch at once on the batch's device.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

pub use simclr_common::pretrain::{AugmentConfig, AugmentPreset};

/// The random choices of one view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewParams {
    /// Affine map from output to input coordinates, both normalised to [-1, 1] (row-major 2x3).
    pub theta: [f64; 6],
    /// Brightness and contrast factors (1 = unchanged), and whether contrast comes first.
    pub brightness: f64,
    pub contrast: f64,
    pub contrast_first: bool,
    pub gamma: f64,
    /// Gaussian blur sigma in pixels of the output, if blurred.
    pub blur_sigma: Option<f64>,
}

impl ViewParams {
    pub const IDENTITY: ViewParams = ViewParams {
        theta: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        brightness: 1.0,
        contrast: 1.0,
        contrast_first: false,
        gamma: 1.0,
        blur_sigma: None,
    };
}

/// A generator seeded from (seed, sample, epoch, view) through SplitMix64 mixing.
pub fn view_rng(seed: u64, sample: u64, epoch: u64, view: u64) -> ChaCha8Rng {
    let mut h = seed;
    for v in [sample, epoch, view] {
        h = splitmix(h ^ splitmix(v.wrapping_add(0x9E37_79B9_7F4A_7C15)));
    }
    ChaCha8Rng::seed_from_u64(h)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draws one view's parameters. Every draw happens whatever the probabilities, so that one setting
/// does not shift the random stream of the others.
pub fn sample_view(config: &AugmentConfig, seed: u64, sample: u64, epoch: u64, view: u64) -> ViewParams {
    if !config.enabled {
        return ViewParams::IDENTITY;
    }
    let mut rng = view_rng(seed, sample, epoch, view);
    // Random resized crop, torchvision's way: up to 10 tries at (area, ratio), else the whole image.
    let (mut w, mut h) = (1.0, 1.0);
    for _ in 0..10 {
        let area = rng.gen_range(config.crop_scale.0..=config.crop_scale.1);
        let log_ratio = rng.gen_range(config.crop_ratio.0.ln()..=config.crop_ratio.1.ln());
        let ratio = log_ratio.exp();
        let (cw, ch) = ((area * ratio).sqrt(), (area / ratio).sqrt());
        if cw <= 1.0 && ch <= 1.0 {
            (w, h) = (cw, ch);
            break;
        }
    }
    // Crop centre, in normalised coordinates, keeping the crop inside the image.
    let cx = rng.gen_range(-(1.0 - w)..=(1.0 - w));
    let cy = rng.gen_range(-(1.0 - h)..=(1.0 - h));
    let flip = if rng.gen_bool(config.flip_p) { -1.0 } else { 1.0 };
    let angle = rng.gen_range(-1.0..=1.0) * config.rotation_degrees.to_radians();
    let (sin, cos) = angle.sin_cos();
    // Input = centre + R(angle) * diag(w, h) * diag(flip, 1) * output.
    let theta = [cos * w * flip, -sin * h, cx, sin * w * flip, cos * h, cy];

    let s = 0.8 * config.jitter_strength;
    let jitter = rng.gen_bool(config.jitter_p);
    let brightness = rng.gen_range((1.0 - s).max(0.0)..=1.0 + s);
    let contrast = rng.gen_range((1.0 - s).max(0.0)..=1.0 + s);
    let contrast_first = rng.gen_bool(0.5);
    let gamma_on = rng.gen_bool(config.gamma_p);
    let gamma = rng.gen_range(config.gamma.0..=config.gamma.1);
    let blur = rng.gen_bool(config.blur_p);
    let sigma = rng.gen_range(config.blur_sigma.0..=config.blur_sigma.1);
    ViewParams {
        theta,
        brightness: if jitter { brightness } else { 1.0 },
        contrast: if jitter { contrast } else { 1.0 },
        contrast_first,
        gamma: if gamma_on { gamma } else { 1.0 },
        blur_sigma: blur.then_some(sigma),
    }
}

/// Applies one parameter set per image: `images` N x 1 x H x W in [0, 1] -> N x 1 x out x out.
pub fn augment(images: &Tensor, params: &[ViewParams], out: i64) -> Tensor {
    let (n, c, _, _) = images.size4().expect("images N x 1 x H x W");
    assert_eq!(c, 1, "grayscale images");
    assert_eq!(params.len() as i64, n, "one parameter set per image");
    if images.size()[2] == out && images.size()[3] == out && params.iter().all(|p| *p == ViewParams::IDENTITY) {
        return images.shallow_clone();
    }
    let device = images.device();
    let kind = images.kind();
    let theta: Vec<f64> = params.iter().flat_map(|p| p.theta).collect();
    let theta = Tensor::from_slice(&theta).view([n, 2, 3]).to_kind(kind).to_device(device);
    let grid = Tensor::affine_grid_generator(&theta, [n, 1, out, out], false);
    // Bilinear, zeros outside the image, align_corners = false (as torchvision's resized crop).
    let mut x = images.grid_sampler(&grid, 0, 0, false);

    let column = |values: Vec<f64>| Tensor::from_slice(&values).view([n, 1, 1, 1]).to_kind(kind).to_device(device);
    let brightness = column(params.iter().map(|p| p.brightness).collect());
    let contrast = column(params.iter().map(|p| p.contrast).collect());
    let contrast_first = column(params.iter().map(|p| if p.contrast_first { 1.0 } else { 0.0 }).collect());
    let adjust_brightness = |x: &Tensor| (x * &brightness).clamp(0.0, 1.0);
    let adjust_contrast = |x: &Tensor| {
        let mean = x.mean_dim([1i64, 2, 3].as_slice(), true, kind);
        (&mean + (x - &mean) * &contrast).clamp(0.0, 1.0)
    };
    let bc = adjust_contrast(&adjust_brightness(&x));
    let cb = adjust_brightness(&adjust_contrast(&x));
    x = &cb * &contrast_first + &bc * (1.0 - &contrast_first);

    let gamma = column(params.iter().map(|p| p.gamma).collect());
    x = x.clamp(0.0, 1.0).pow(&gamma);

    if params.iter().any(|p| p.blur_sigma.is_some()) {
        x = blur(&x, params, out);
    }
    x
}

/// Separable Gaussian blur, one kernel per image (a delta for images not blurred), kernel size 10% of
/// the side rounded to an odd number, reflected borders.
fn blur(x: &Tensor, params: &[ViewParams], side: i64) -> Tensor {
    let n = params.len() as i64;
    let radius = ((side as f64 * 0.1) / 2.0).floor().max(1.0) as i64;
    let size = 2 * radius + 1;
    let mut weights = Vec::with_capacity((n * size) as usize);
    for p in params {
        weights.extend(gaussian_kernel(p.blur_sigma, radius));
    }
    let kernel = Tensor::from_slice(&weights).view([n, 1, 1, size]).to_kind(x.kind()).to_device(x.device());
    // The batch as channels of one image, so that each gets its own kernel (grouped convolution).
    let y = x.view([1, n, side, side]).reflection_pad2d([radius, radius, 0, 0]);
    let y = y.conv2d(&kernel, None::<Tensor>, [1, 1], [0, 0], [1, 1], n);
    let y = y.reflection_pad2d([0, 0, radius, radius]);
    let y = y.conv2d(&kernel.view([n, 1, size, 1]), None::<Tensor>, [1, 1], [0, 0], [1, 1], n);
    y.view([n, 1, side, side])
}

/// Normalised Gaussian weights at offsets -radius..=radius (a delta without sigma).
pub fn gaussian_kernel(sigma: Option<f64>, radius: i64) -> Vec<f64> {
    match sigma {
        None => (-radius..=radius).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect(),
        Some(sigma) => {
            let raw: Vec<f64> = (-radius..=radius).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp()).collect();
            let total: f64 = raw.iter().sum();
            raw.into_iter().map(|v| v / total).collect()
        }
    }
}

/// Both views of a batch: images N x 1 x H x W (or N x 2 x H x W: each sample's second view from its
/// second image, `pretrain.positives`) with their sample ids -> (view 0, view 1), each N x 1 x out x out.
pub fn two_views(
    config: &AugmentConfig,
    images: &Tensor,
    samples: &[u64],
    seed: u64,
    epoch: u64,
    out: i64,
) -> (Tensor, Tensor) {
    // Two images per sample (N x 2 x S x S): the first view from the first, the second from the second.
    let source = |v: i64| if images.size()[1] == 2 { images.narrow(1, v, 1) } else { images.shallow_clone() };
    let view = |v: u64| {
        let params: Vec<ViewParams> = samples.iter().map(|&s| sample_view(config, seed, s, epoch, v)).collect();
        augment(&source(v as i64), &params, out)
    };
    (view(0), view(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn images(n: i64, side: i64) -> Tensor {
        crate::engine::model::with_torch_seed(1, || Tensor::rand([n, 1, side, side], (Kind::Double, Device::Cpu)))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn identity_parameters_give_the_image_back() {
        let x = images(3, 16);
        let y = augment(&x, &[ViewParams::IDENTITY; 3], 16);
        assert!(max_diff(&x, &y) < 1e-12);
        // Disabled augmentation draws identity parameters.
        assert_eq!(sample_view(&AugmentConfig::disabled(), 1, 2, 3, 0), ViewParams::IDENTITY);
    }

    #[test]
    fn flip_and_quarter_turn_are_exact_pixel_permutations() {
        let x = images(1, 8);
        let flip = ViewParams { theta: [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0], ..ViewParams::IDENTITY };
        assert!(max_diff(&augment(&x, &[flip], 8), &x.flip([3])) < 1e-12);
        // theta for +90 degrees: input = R(90) * output, which is torch's rot90 with k = 1 over (H, W):
        // a positive angle turns the image counterclockwise as displayed (row 0 on top).
        let turn = ViewParams { theta: [0.0, -1.0, 0.0, 1.0, 0.0, 0.0], ..ViewParams::IDENTITY };
        assert!(max_diff(&augment(&x, &[turn], 8), &x.rot90(1, [2, 3])) < 1e-12);
    }

    #[test]
    fn crops_sample_the_chosen_region() {
        // The right half, enlarged 2x: output column j samples input column 8 + (j + 0.5) / 2 - 0.5,
        // on a ramp whose column c holds c / 16.
        let side = 16;
        let ramp = (Tensor::arange(side, (Kind::Double, Device::Cpu)) / side as f64)
            .view([1, 1, 1, side])
            .expand([1, 1, side, side], true);
        let half = ViewParams { theta: [0.5, 0.0, 0.5, 0.0, 1.0, 0.0], ..ViewParams::IDENTITY };
        let y = augment(&ramp.contiguous(), &[half], side);
        for j in 1..side - 1 {
            let want = (8.0 + (j as f64 + 0.5) / 2.0 - 0.5) / side as f64;
            assert!((y.double_value(&[0, 0, 3, j]) - want).abs() < 1e-9, "column {j}");
        }
    }

    #[test]
    fn brightness_contrast_and_gamma_follow_the_formulas() {
        let x = (images(1, 8) * 0.5 + 0.25).contiguous();
        // Brightness 1.6 clamps the top, so the two orders differ (without clamping they commute).
        let p =
            ViewParams { brightness: 1.6, contrast: 0.7, contrast_first: false, gamma: 1.5, ..ViewParams::IDENTITY };
        let y = augment(&x, &[p], 8);
        let b = (&x * 1.6).clamp(0.0, 1.0);
        let mean = b.mean(Kind::Double);
        let want = ((&mean + (&b - &mean) * 0.7).clamp(0.0, 1.0)).pow_tensor_scalar(1.5);
        assert!(max_diff(&y, &want) < 1e-12);
        // The other order differs.
        let q = ViewParams { contrast_first: true, ..p };
        assert!(max_diff(&augment(&x, &[q], 8), &y) > 1e-6);
    }

    #[test]
    fn blur_is_the_gaussian_kernel() {
        // A single bright pixel away from the borders spreads into the outer product of the kernel.
        let side = 40; // radius 2, kernel 5
        let x = Tensor::zeros([1, 1, side, side], (Kind::Double, Device::Cpu));
        let _ = x.get(0).get(0).get(20).get(20).fill_(1.0);
        let p = ViewParams { blur_sigma: Some(1.3), ..ViewParams::IDENTITY };
        let y = augment(&x, &[p], side);
        let k = gaussian_kernel(Some(1.3), 2);
        for (di, ki) in k.iter().enumerate() {
            for (dj, kj) in k.iter().enumerate() {
                let got = y.double_value(&[0, 0, 18 + di as i64, 18 + dj as i64]);
                assert!((got - ki * kj).abs() < 1e-12, "({di},{dj}): {got} vs {}", ki * kj);
            }
        }
        assert!((y.sum(Kind::Double).double_value(&[]) - 1.0).abs() < 1e-12);
        // In a batch, an image without blur is untouched.
        let both = Tensor::cat(&[&x, &x], 0);
        let out = augment(&both, &[p, ViewParams::IDENTITY], side);
        assert!(max_diff(&out.get(1), &x.get(0)) < 1e-12);
    }

    #[test]
    fn views_depend_only_on_seed_sample_epoch_and_view() {
        let config = AugmentConfig::cxr();
        let x = images(4, 16);
        let (a0, a1) = two_views(&config, &x, &[10, 11, 12, 13], 5, 2, 12);
        // Sample 12 alone, in another batch position and batch size: the same views.
        let alone = x.narrow(0, 2, 1);
        let (b0, b1) = two_views(&config, &alone, &[12], 5, 2, 12);
        assert!(max_diff(&a0.narrow(0, 2, 1), &b0) == 0.0 && max_diff(&a1.narrow(0, 2, 1), &b1) == 0.0);
        // The two views differ, and so do other epochs.
        for i in 0..4 {
            assert!(max_diff(&a0.get(i), &a1.get(i)) > 1e-3, "views of image {i} are equal");
        }
        let (c0, _) = two_views(&config, &x, &[10, 11, 12, 13], 5, 3, 12);
        assert!(max_diff(&a0, &c0) > 1e-3);
    }

    #[test]
    fn probabilities_and_ranges_hold_over_many_draws() {
        let config = AugmentConfig::cxr();
        let draws: Vec<ViewParams> = (0..4000).map(|s| sample_view(&config, 9, s, 0, s % 2)).collect();
        let rate = |f: &dyn Fn(&ViewParams) -> bool| draws.iter().filter(|p| f(p)).count() as f64 / draws.len() as f64;
        assert!((rate(&|p| p.theta[0] < 0.0) - 0.5).abs() < 0.04, "flip");
        assert!((rate(&|p| p.brightness != 1.0) - 0.8).abs() < 0.04, "jitter");
        assert!((rate(&|p| p.blur_sigma.is_some()) - 0.5).abs() < 0.04, "blur");
        assert!((rate(&|p| p.gamma != 1.0) - 0.5).abs() < 0.04, "gamma");
        for p in &draws {
            // Crop area: |det| of the 2x2 part is the area fraction (w * h), rotation included.
            let area = (p.theta[0] * p.theta[4] - p.theta[1] * p.theta[3]).abs();
            assert!((0.3 - 1e-9..=1.0 + 1e-9).contains(&area), "area {area}");
            assert!((0.6..=1.4).contains(&p.brightness) && (0.7..=1.4).contains(&p.gamma));
            // theta[0] = cos * w * flip, theta[3] = sin * w * flip.
            let angle = p.theta[3].atan2(p.theta[0]).to_degrees().abs();
            assert!(angle <= 10.0 + 1e-9 || (180.0 - angle) <= 10.0 + 1e-9, "angle {angle}");
        }
    }

    #[test]
    fn with_two_images_per_sample_the_second_view_comes_from_the_second() {
        // Augmentation off: each view is its source image resized; the first image is all zeros, the
        // second all ones.
        let config = AugmentConfig::disabled();
        let pair = Tensor::cat(
            &[
                Tensor::zeros([3, 1, 16, 16], (Kind::Float, Device::Cpu)),
                Tensor::ones([3, 1, 16, 16], (Kind::Float, Device::Cpu)),
            ],
            1,
        );
        let (a, b) = two_views(&config, &pair, &[1, 2, 3], 0, 0, 8);
        assert_eq!(a.size(), [3, 1, 8, 8]);
        assert_eq!(a.abs().max().double_value(&[]), 0.0);
        assert!((b.min().double_value(&[]) - 1.0).abs() < 1e-6);
    }
}
