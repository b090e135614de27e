//! The synthetic SIIM dataset: deterministic, readable by our own index and pipeline, anatomically the
//! right way round, with the reference class balance, and not trivially separable.

use std::path::Path;

use rand::SeedableRng;
use simclr_data::dataset::{split_studies, Dataset};
use simclr_data::index::{index_tree, list_files};
use simclr_data::labels::LabelTable;
use simclr_data::phantom::StudyClass;
use simclr_data::pixels::{decode_file, resize};
use simclr_data::synth::{write_dataset, SynthOptions};

fn synth(dir: &Path, studies: usize, seed: u64, size: usize) {
    write_dataset(dir, &SynthOptions { studies, seed, image_size: size }).unwrap();
}

#[test]
fn same_seed_same_bytes_other_seed_other_data() {
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synth(a.path(), 12, 5, 32);
    // A different thread count must not change a byte.
    rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| synth(b.path(), 12, 5, 32));
    synth(c.path(), 12, 6, 32);
    let files = |root: &Path| -> Vec<(String, Vec<u8>)> {
        let mut all: Vec<_> = list_files(root).unwrap();
        all.extend(["train_study_level.csv", "train_image_level.csv"].map(|f| root.join(f)));
        all.iter().map(|p| (p.strip_prefix(root).unwrap().display().to_string(), std::fs::read(p).unwrap())).collect()
    };
    assert_eq!(files(a.path()), files(b.path()));
    assert_ne!(files(a.path()), files(c.path()));
}

#[test]
fn class_shares_follow_the_reference_data() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let n = 20_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[StudyClass::sample(&mut rng) as usize] += 1;
    }
    // Negative 27%, Typical 47%, Indeterminate 17%, Atypical 8% (+-1.5 points).
    for (count, share) in counts.iter().zip([0.28, 0.47, 0.17, 0.08]) {
        assert!((*count as f64 / n as f64 - share).abs() < 0.015, "{counts:?}");
    }
}

/// Mean over a box given in fractions of the image side.
fn mean_box(img: &[f32], side: usize, x: (f64, f64), y: (f64, f64)) -> f64 {
    let range = |r: (f64, f64)| ((r.0 * side as f64) as usize)..((r.1 * side as f64) as usize);
    let (mut sum, mut n) = (0.0, 0);
    for row in range(y) {
        for col in range(x) {
            sum += img[row * side + col] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

struct Loaded {
    paths: Vec<std::path::PathBuf>,
    images: Vec<Vec<f32>>,
    typical: Vec<bool>,
    split: simclr_data::dataset::StudySplit,
    study_of: Vec<usize>,
}

fn load(root: &Path, side: u32) -> Loaded {
    let index = index_tree(root, Default::default(), &|_, _| {}).unwrap();
    assert!(index.bad.is_empty(), "{:?}", index.bad);
    let labels = LabelTable::load(root).unwrap();
    let dataset = Dataset::assemble(index, &labels);
    assert!(dataset.orphan_label_rows.is_empty());
    let typical_col = dataset.label_columns.iter().position(|c| c == "Typical Appearance").unwrap();
    let mut study_of = vec![0; dataset.index.images.len()];
    for (s, study) in dataset.studies.iter().enumerate() {
        for &i in &study.images {
            study_of[i] = s;
        }
    }
    let images =
        dataset.index.images.iter().map(|img| resize(&decode_file(&root.join(&img.path)).unwrap(), side)).collect();
    let typical = study_of.iter().map(|&s| dataset.studies[s].labels.as_ref().unwrap()[typical_col] > 0.5).collect();
    let split = split_studies(&dataset.studies, 0.15, 0.0, 0).unwrap();
    let paths = dataset.index.images.iter().map(|i| root.join(&i.path)).collect();
    Loaded { paths, images, typical, split, study_of }
}

#[test]
fn every_file_decodes_bright_spine_dark_lungs_whatever_its_encoding() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 60, 11, 64);
    let loaded = load(dir.path(), 64);
    for (k, img) in loaded.images.iter().enumerate() {
        let spine = mean_box(img, 64, (0.47, 0.53), (0.3, 0.6));
        let left_lung = mean_box(img, 64, (0.22, 0.32), (0.3, 0.5));
        let right_lung = mean_box(img, 64, (0.68, 0.78), (0.3, 0.5));
        // Large patients fill the detector's width; the corners are always air, the darkest.
        let corner = mean_box(img, 64, (0.0, 0.05), (0.0, 0.05));
        let path = loaded.paths[k].display();
        assert!(
            spine > left_lung + 0.1 && spine > right_lung + 0.1,
            "{path}: spine {spine} lungs {left_lung} {right_lung}"
        );
        assert!(corner < left_lung, "{path}: air outside the body must be darkest: {corner} vs {left_lung}");
    }
}

/// Logistic regression on raw pixels (32x32), trained on the train split, scored on the test split.
#[test]
fn typical_is_learnable_but_a_linear_probe_on_raw_pixels_is_not_perfect() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path(), 300, 3, 64);
    let loaded = load(dir.path(), 32);
    let test_studies: std::collections::BTreeSet<usize> = loaded.split.test.iter().copied().collect();
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for i in 0..loaded.images.len() {
        if test_studies.contains(&loaded.study_of[i]) {
            test.push(i)
        } else {
            train.push(i)
        }
    }
    let d = 32 * 32;
    // Standardise features with train statistics.
    let mean: Vec<f64> =
        (0..d).map(|j| train.iter().map(|&i| loaded.images[i][j] as f64).sum::<f64>() / train.len() as f64).collect();
    let std: Vec<f64> = (0..d)
        .map(|j| {
            (train.iter().map(|&i| (loaded.images[i][j] as f64 - mean[j]).powi(2)).sum::<f64>() / train.len() as f64)
                .sqrt()
                .max(1e-6)
        })
        .collect();
    let x = |i: usize| -> Vec<f64> { (0..d).map(|j| (loaded.images[i][j] as f64 - mean[j]) / std[j]).collect() };
    let xs_train: Vec<Vec<f64>> = train.iter().map(|&i| x(i)).collect();
    let (mut w, mut b) = (vec![0.0; d], 0.0);
    for _ in 0..300 {
        let mut gw = vec![0.0; d];
        let mut gb = 0.0;
        for (xi, &i) in xs_train.iter().zip(&train) {
            let z: f64 = xi.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + b;
            let err = 1.0 / (1.0 + (-z).exp()) - if loaded.typical[i] { 1.0 } else { 0.0 };
            for (g, v) in gw.iter_mut().zip(xi) {
                *g += err * v;
            }
            gb += err;
        }
        let n = train.len() as f64;
        for (wj, g) in w.iter_mut().zip(&gw) {
            *wj -= 0.05 * (g / n + 1e-3 * *wj);
        }
        b -= 0.05 * gb / n;
    }
    let accuracy = |set: &[usize]| {
        let correct = set
            .iter()
            .filter(|&&i| {
                let z: f64 = x(i).iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + b;
                (z > 0.0) == loaded.typical[i]
            })
            .count();
        correct as f64 / set.len() as f64
    };
    let (train_acc, test_acc) = (accuracy(&train), accuracy(&test));
    let typical_rate = test.iter().filter(|&&i| loaded.typical[i]).count() as f64 / test.len() as f64;
    eprintln!(
        "raw-pixel logistic regression: train {train_acc:.3}, test {test_acc:.3}, test Typical rate {typical_rate:.3}"
    );
    assert!(test_acc < 0.95, "a linear probe on raw pixels separates the classes: {test_acc}");

    // Learnable: the lower lung zones, where Typical findings sit, are measurably denser on average.
    let zone = |i: usize| {
        mean_box(&loaded.images[i], 32, (0.15, 0.35), (0.45, 0.65))
            + mean_box(&loaded.images[i], 32, (0.65, 0.85), (0.45, 0.65))
    };
    let mean_of = |want: bool| {
        let v: Vec<f64> = (0..loaded.images.len()).filter(|&i| loaded.typical[i] == want).map(zone).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(mean_of(true) > mean_of(false), "Typical lower zones {} vs others {}", mean_of(true), mean_of(false));
}
