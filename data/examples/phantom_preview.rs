//! Renders phantoms of each class side by side into a PNG, to look at what `synth` writes:
//! `cargo run -p simclr-data --example phantom_preview -- preview.png [seed]`
//! Rows: Negative, Typical, Indeterminate, Atypical; four patients per row.

use rand::SeedableRng;
use simclr_data::phantom::{render, sample_findings, Acquisition, Anatomy, StudyClass};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = args.next().unwrap_or_else(|| "phantom_preview.png".into());
    let seed: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);
    let (size, per_row) = (256usize, 4usize);
    let mut grid = image::GrayImage::new((size * per_row) as u32, (size * 4) as u32);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (row, class) in StudyClass::ALL.into_iter().enumerate() {
        for col in 0..per_row {
            let anatomy = Anatomy::sample(&mut rng);
            let findings = sample_findings(class, &anatomy, &mut rng);
            let acq = Acquisition::sample(&mut rng);
            let (pixels, _) = render(size, &anatomy, &findings, &acq, &mut rng);
            for (i, v) in pixels.iter().enumerate() {
                let (x, y) = ((col * size + i % size) as u32, (row * size + i / size) as u32);
                grid.put_pixel(x, y, image::Luma([(v * 255.0).round() as u8]));
            }
        }
    }
    grid.save(&out)?;
    println!("wrote {out}");
    Ok(())
}
