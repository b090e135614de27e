//! Chest-radiograph phantoms: an attenuation map of a frontal chest (torso, lungs, heart, diaphragm
//! domes, spine, clavicles, ribs) with findings that depend on the SIIM study label, under random
//! patient size, position, rotation, exposure, blur and noise. Stands in for the SIIM-FISABIO-RSNA
//! images, which cannot be downloaded here.
//!
//! The findings follow the radiological descriptions of the four classes: Typical = bilateral,
//! peripheral, lower-zone ground-glass opacities; Atypical = unilateral lobar consolidation;
//! Indeterminate = few, faint, central or unilateral opacities; Negative = clear lungs. Their strength
//! varies widely and weak cases overlap, so the label is learnable but not trivially.

use rand::Rng;

/// The four study-level classes of the SIIM-FISABIO-RSNA data, in the CSV's column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StudyClass {
    Negative,
    Typical,
    Indeterminate,
    Atypical,
}

impl StudyClass {
    pub const ALL: [StudyClass; 4] =
        [StudyClass::Negative, StudyClass::Typical, StudyClass::Indeterminate, StudyClass::Atypical];

    /// Column names of `train_study_level.csv`.
    pub fn column(self) -> &'static str {
        match self {
            StudyClass::Negative => "Negative for Pneumonia",
            StudyClass::Typical => "Typical Appearance",
            StudyClass::Indeterminate => "Indeterminate Appearance",
            StudyClass::Atypical => "Atypical Appearance",
        }
    }

    /// Class shares of the reference data: 27% / 47% / 17% / 8% (rounded; the remainder is Negative).
    pub fn sample(rng: &mut impl Rng) -> StudyClass {
        let u: f64 = rng.gen();
        if u < 0.47 {
            StudyClass::Typical
        } else if u < 0.64 {
            StudyClass::Indeterminate
        } else if u < 0.72 {
            StudyClass::Atypical
        } else {
            StudyClass::Negative
        }
    }
}

/// Patient-level anatomy, shared by every image of a patient's studies.
#[derive(Debug, Clone)]
pub struct Anatomy {
    /// Torso half-width as a fraction of the image half-width.
    pub body_width: f64,
    pub lung_width: f64,
    pub lung_height: f64,
    pub heart_size: f64,
    pub rib_spacing: f64,
}

impl Anatomy {
    pub fn sample(rng: &mut impl Rng) -> Anatomy {
        let size: f64 = rng.gen_range(0.85..1.1);
        Anatomy {
            body_width: 0.86 * size,
            lung_width: rng.gen_range(0.29..0.35) * size,
            lung_height: rng.gen_range(0.52..0.64) * size,
            heart_size: rng.gen_range(0.85..1.2),
            rib_spacing: rng.gen_range(0.095..0.12) * size,
        }
    }
}

/// An opacity in lung coordinates: centre, radii (x, y), density and edge sharpness.
#[derive(Debug, Clone, Copy)]
pub struct Opacity {
    pub cx: f64,
    pub cy: f64,
    pub rx: f64,
    pub ry: f64,
    pub density: f64,
    /// 1: soft ground glass; larger: sharper, consolidation-like edge.
    pub sharpness: f64,
}

/// Bounding box of a finding in pixels (x, y, width, height), as the image-level CSV gives them.
pub type PixelBox = (f64, f64, f64, f64);

/// One image's acquisition: geometry and exposure.
#[derive(Debug, Clone)]
pub struct Acquisition {
    pub rotation_rad: f64,
    pub shift: (f64, f64),
    pub zoom: f64,
    /// Contrast of the attenuation-to-intensity curve.
    pub exposure: f64,
    pub gamma: f64,
    pub noise: f64,
    pub blur_px: f64,
}

impl Acquisition {
    pub fn sample(rng: &mut impl Rng) -> Acquisition {
        Acquisition {
            rotation_rad: rng.gen_range(-5.0f64..5.0).to_radians(),
            shift: (rng.gen_range(-0.05..0.05), rng.gen_range(-0.05..0.05)),
            zoom: rng.gen_range(0.9..1.1),
            exposure: rng.gen_range(0.8..1.25),
            gamma: rng.gen_range(0.8..1.25),
            noise: rng.gen_range(0.01..0.035),
            blur_px: rng.gen_range(0.0..1.2),
        }
    }
}

/// The findings a class shows, drawn at random.
pub fn sample_findings<R: Rng>(class: StudyClass, anatomy: &Anatomy, rng: &mut R) -> Vec<Opacity> {
    let lw = anatomy.lung_width;
    let lh = anatomy.lung_height;
    // Lung centres at x = -+0.5*body_width; lower zone towards +y (image down).
    let lung_x = |side: f64| side * (anatomy.body_width * 0.5);
    let mut out = Vec::new();
    let mut push = |rng: &mut R, cx: f64, cy: f64, r: (f64, f64), density: f64, sharpness: f64| {
        let radius = rng.gen_range(r.0..r.1);
        let aspect: f64 = rng.gen_range(0.7..1.4);
        out.push(Opacity { cx, cy, rx: radius * aspect, ry: radius / aspect, density, sharpness });
    };
    match class {
        StudyClass::Negative => {}
        StudyClass::Typical => {
            // Bilateral (usually), peripheral, lower zones, ground glass; strength varies widely.
            let strength: f64 = rng.gen_range(0.1..0.55);
            for side in [-1.0, 1.0] {
                if rng.gen_bool(0.12) {
                    continue;
                }
                for _ in 0..rng.gen_range(1..=3) {
                    let cx = lung_x(side) + side * rng.gen_range(0.35..0.8) * lw;
                    let cy = rng.gen_range(0.1..0.45) * lh + 0.05;
                    let density = strength * rng.gen_range(0.7..1.2);
                    push(rng, cx, cy, (0.07, 0.14), density, 1.0);
                }
            }
        }
        StudyClass::Atypical => {
            // One lung, one lobe: a dense, sharper-edged consolidation.
            let side = if rng.gen_bool(0.5) { -1.0 } else { 1.0 };
            let upper = rng.gen_bool(0.5);
            let cy = if upper { -0.25 * lh } else { 0.2 * lh };
            let cx = lung_x(side) + side * rng.gen_range(-0.2..0.3) * lw;
            let (density, sharpness) = (rng.gen_range(0.25..0.7), rng.gen_range(2.5..5.0));
            push(rng, cx, cy, (0.1, 0.17), density, sharpness);
        }
        StudyClass::Indeterminate => {
            // Few, faint opacities, central (perihilar) or on one side only.
            let strength: f64 = rng.gen_range(0.05..0.3);
            let central = rng.gen_bool(0.6);
            let side = if rng.gen_bool(0.5) { -1.0 } else { 1.0 };
            for _ in 0..rng.gen_range(1..=2) {
                let cx = if central {
                    lung_x(side) - side * rng.gen_range(0.3..0.7) * lw
                } else {
                    lung_x(side) + side * rng.gen_range(0.0..0.6) * lw
                };
                let cy = rng.gen_range(-0.2..0.25) * lh;
                let sharpness = rng.gen_range(1.0..2.0);
                push(rng, cx, cy, (0.05, 0.11), strength, sharpness);
            }
        }
    }
    out
}

/// Renders the attenuation map (0 = air, about 1 = dense bone), then exposure, blur and noise, into
/// display intensities in [0, 1] (bright = dense, as a MONOCHROME2 radiograph shows them).
/// Returns the image row-major and each finding's bounding box in pixels.
pub fn render(
    size: usize,
    anatomy: &Anatomy,
    findings: &[Opacity],
    acq: &Acquisition,
    rng: &mut impl Rng,
) -> (Vec<f32>, Vec<PixelBox>) {
    let (sin, cos) = acq.rotation_rad.sin_cos();
    let half = size as f64 / 2.0;
    let mut atten = vec![0f64; size * size];
    for py in 0..size {
        for px in 0..size {
            // Pixel -> patient coordinates (x right, y down, both in [-1, 1]), rotated and shifted.
            let x0 = (px as f64 + 0.5 - half) / half / acq.zoom - acq.shift.0;
            let y0 = (py as f64 + 0.5 - half) / half / acq.zoom - acq.shift.1;
            let x = cos * x0 - sin * y0;
            let y = sin * x0 + cos * y0;
            atten[py * size + px] = attenuation(x, y, anatomy, findings);
        }
    }
    let blurred = if acq.blur_px > 0.3 { gaussian_blur(&atten, size, acq.blur_px) } else { atten };
    let image = blurred
        .iter()
        .map(|&a| {
            let i = 1.0 - (-acq.exposure * 2.2 * a).exp();
            let i = i.clamp(0.0, 1.0).powf(acq.gamma);
            let noisy = i + acq.noise * gaussian(rng);
            noisy.clamp(0.0, 1.0) as f32
        })
        .collect();
    let boxes = findings
        .iter()
        .map(|o| {
            // Bounding box of the ellipse mapped back to pixels (rotation ignored: boxes are axis
            // aligned in the image, as radiologists draw them; the margin covers small rotations).
            let to_px = |x: f64, y: f64| {
                let xr = cos * x + sin * y;
                let yr = -sin * x + cos * y;
                ((xr + acq.shift.0) * acq.zoom * half + half, (yr + acq.shift.1) * acq.zoom * half + half)
            };
            let (cx, cy) = to_px(o.cx, o.cy);
            let w = 2.0 * o.rx * 1.4 * acq.zoom * half;
            let h = 2.0 * o.ry * 1.4 * acq.zoom * half;
            (cx - w / 2.0, cy - h / 2.0, w, h)
        })
        .collect();
    (image, boxes)
}

fn smoothstep(edge: f64, width: f64, v: f64) -> f64 {
    // 1 inside (v < edge - width), 0 outside (v > edge + width).
    let t = ((edge + width - v) / (2.0 * width)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

fn ellipse(x: f64, y: f64, cx: f64, cy: f64, rx: f64, ry: f64) -> f64 {
    (((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2)).sqrt()
}

fn attenuation(x: f64, y: f64, a: &Anatomy, findings: &[Opacity]) -> f64 {
    // Soft tissue of the torso, thicker towards the midline.
    let body = smoothstep(1.0, 0.04, ellipse(x, y, 0.0, 0.05, a.body_width, 1.15));
    let mut att = body * (0.42 + 0.12 * (1.0 - (x / a.body_width).powi(2)).max(0.0));
    // Lungs: air-filled, subtract attenuation; bounded below by the diaphragm domes.
    let mut lung = 0.0f64;
    for side in [-1.0, 1.0] {
        let cx = side * a.body_width * 0.5;
        let cy = -0.08;
        let inside = smoothstep(1.0, 0.05, ellipse(x, y, cx, cy, a.lung_width, a.lung_height));
        // Dome: lung ends above a parabola peaking at the lung centre (right dome slightly higher).
        let dome_top =
            cy + a.lung_height * 0.78 - 0.35 * ((x - cx) / a.lung_width).powi(2) + if side < 0.0 { -0.03 } else { 0.0 };
        let above_dome = smoothstep(dome_top, 0.03, y);
        lung = lung.max(inside * above_dome);
    }
    // Heart: soft-tissue density over the medial left lung (patient's left = image right).
    let heart = smoothstep(1.0, 0.08, ellipse(x, y, 0.1, 0.22, 0.3 * a.heart_size, 0.24 * a.heart_size));
    lung *= 1.0 - 0.85 * heart;
    att -= 0.3 * lung;
    // Spine and mediastinum.
    att += 0.28 * smoothstep(0.09, 0.03, x.abs()) * body;
    // Clavicles: slanted bands near the top.
    for side in [-1.0f64, 1.0] {
        let along = side * x;
        if (0.05..0.6).contains(&along) {
            let yc = -0.6 - 0.18 * along + 0.3 * (along - 0.25).powi(2);
            att += 0.22 * smoothstep(0.025, 0.012, (y - yc).abs());
        }
    }
    // Posterior ribs: arcs from the spine sloping down and out over each hemithorax, fading towards the
    // lung bases.
    let rib_region = smoothstep(1.0, 0.05, ellipse(x, y, 0.0, -0.08, a.body_width * 0.95, a.lung_height * 1.12));
    if rib_region > 0.0 && x.abs() > 0.06 {
        let lateral = (x.abs() / a.body_width).min(1.0);
        let curve = 0.28 * lateral * lateral + 0.12 * lateral;
        let phase = (y + 0.75 - curve) / a.rib_spacing;
        let frac = phase - phase.floor();
        let band = smoothstep(0.25, 0.12, (frac - 0.5).abs());
        att += rib_region * 0.06 * band * smoothstep(0.5, 0.15, y);
    }
    // Findings live inside the lungs.
    let mut extra = 0.0f64;
    for o in findings {
        let d = ellipse(x, y, o.cx, o.cy, o.rx, o.ry);
        let profile = if o.sharpness <= 1.0 { (-1.5 * d * d).exp() } else { smoothstep(1.0, 0.5 / o.sharpness, d) };
        extra = extra.max(o.density * profile);
    }
    att + 0.6 * extra * lung
}

/// Separable Gaussian blur with clamped edges.
fn gaussian_blur(img: &[f64], size: usize, sigma: f64) -> Vec<f64> {
    let radius = (3.0 * sigma).ceil() as isize;
    let kernel: Vec<f64> = (-radius..=radius).map(|k| (-(k * k) as f64 / (2.0 * sigma * sigma)).exp()).collect();
    let norm: f64 = kernel.iter().sum();
    let pass = |src: &[f64], horizontal: bool| {
        let mut dst = vec![0f64; src.len()];
        for y in 0..size {
            for x in 0..size {
                let mut acc = 0.0;
                for (i, w) in kernel.iter().enumerate() {
                    let k = i as isize - radius;
                    let (sx, sy) = if horizontal { (x as isize + k, y as isize) } else { (x as isize, y as isize + k) };
                    let sx = sx.clamp(0, size as isize - 1) as usize;
                    let sy = sy.clamp(0, size as isize - 1) as usize;
                    acc += w * src[sy * size + sx];
                }
                dst[y * size + x] = acc / norm;
            }
        }
        dst
    };
    pass(&pass(img, true), false)
}

/// Standard normal sample (Box-Muller).
fn gaussian(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
