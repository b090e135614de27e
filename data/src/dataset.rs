//! The dataset as the job sees it: images grouped into studies (and patients), labels joined in,
//! the train/validation/test split at study and patient level, and each epoch's global order of the
//! training images (the same for any number of workers; each rank takes its slice of every global
//! batch). Owns the no-leakage check: no study and no patient may fall on two sides of the split.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

pub use simclr_common::config::ShardPolicy;

use crate::index::{BadKind, DatasetIndex};
use crate::labels::LabelTable;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Study {
    pub uid: String,
    pub patient: Option<String>,
    /// Indices into `Dataset::index.images`, in path order.
    pub images: Vec<usize>,
    /// The study's label values (one per label column), when the label table has them.
    pub labels: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub index: DatasetIndex,
    pub label_columns: Vec<String>,
    pub studies: Vec<Study>,
    /// Label rows that match no image (a study or path absent from the tree).
    pub orphan_label_rows: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DatasetError {
    #[error("leak: study {study} is on both sides of the split")]
    StudyLeak { study: String },
    #[error(
        "leak: patient {patient} has study {first_study} in {first_side} and study {second_study} in {second_side}"
    )]
    PatientLeak {
        patient: String,
        first_side: &'static str,
        first_study: String,
        second_side: &'static str,
        second_study: String,
    },
    #[error("test fraction {0} is not in (0, 1)")]
    TestFraction(f64),
    #[error("validation fraction {0} is not in [0, 1)")]
    ValidationFraction(f64),
    #[error("{images} training images cannot fill one global batch of {batch_size} (pretrain.batch_size)")]
    TooFewImages { images: usize, batch_size: usize },
}

impl Dataset {
    /// Groups the index's images into studies and joins the labels. A study's label is its row in the
    /// SIIM table, or (labels.csv) the row of any of its images: rows of one study must agree, and a
    /// study's images without a row of their own take the study's label. A study whose rows disagree
    /// cannot be labelled: its images move to the unusable list (`BadKind::LabelsDisagree`), naming
    /// each image's values; `data.on_bad_file` then decides whether the job goes on without them.
    pub fn assemble(mut index: DatasetIndex, labels: &LabelTable) -> Dataset {
        if let LabelTable::Plain { images: table, path, columns } = labels {
            let mut rows_of: BTreeMap<&str, Vec<(&PathBuf, &Vec<f32>)>> = BTreeMap::new();
            for img in &index.images {
                if let Some(values) = table.get(&img.path) {
                    rows_of.entry(img.study_uid.as_str()).or_default().push((&img.path, values));
                }
            }
            let disagreeing: BTreeMap<String, String> = rows_of
                .into_iter()
                .filter(|(_, rows)| rows.iter().any(|(_, v)| *v != rows[0].1))
                .map(|(study, rows)| {
                    let shown: Vec<String> = rows
                        .iter()
                        .map(|(p, v)| {
                            let named: Vec<String> =
                                columns.iter().zip(v.iter()).map(|(c, x)| format!("{c}={x}")).collect();
                            format!("{}: {}", p.display(), named.join(" "))
                        })
                        .collect();
                    (
                        study.to_string(),
                        format!(
                            "the images of study {study} disagree on their labels in {} ({}); the study is left out",
                            path.display(),
                            shown.join("; ")
                        ),
                    )
                })
                .collect();
            if !disagreeing.is_empty() {
                index.exclude(|img| disagreeing.get(&img.study_uid).map(|r| (BadKind::LabelsDisagree, r.clone())));
            }
        }
        let mut by_study: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, img) in index.images.iter().enumerate() {
            by_study.entry(img.study_uid.clone()).or_default().push(i);
        }
        let mut studies = Vec::with_capacity(by_study.len());
        let mut matched_rows = BTreeSet::new();
        for (uid, images) in by_study {
            let patient = images.iter().find_map(|&i| index.images[i].patient_id.clone());
            let labels = match labels {
                LabelTable::Siim { studies: table, .. } => {
                    let found = table.get(&uid).cloned();
                    if found.is_some() {
                        matched_rows.insert(uid.clone());
                    }
                    found
                }
                LabelTable::Plain { images: table, .. } => {
                    let mut found = None;
                    for &i in &images {
                        let key = &index.images[i].path;
                        if let Some(values) = table.get(key) {
                            matched_rows.insert(key.display().to_string());
                            found = Some(values.clone());
                        }
                    }
                    found
                }
                LabelTable::Unlabelled => None,
            };
            studies.push(Study { uid, patient, images, labels });
        }
        let excluded: BTreeSet<String> = index.bad.iter().map(|b| b.path.display().to_string()).collect();
        let orphan_label_rows = match labels {
            LabelTable::Siim { studies: table, .. } => {
                table.keys().filter(|k| !matched_rows.contains(*k)).map(|k| format!("{k}_study")).collect()
            }
            // A row of a listed file (unusable, or left out with its study) is not an orphan.
            LabelTable::Plain { images: table, .. } => table
                .keys()
                .map(|k| k.display().to_string())
                .filter(|k| !matched_rows.contains(k) && !excluded.contains(k))
                .collect(),
            LabelTable::Unlabelled => Vec::new(),
        };
        Dataset { index, label_columns: labels.columns().to_vec(), studies, orphan_label_rows }
    }

    pub fn labelled_studies(&self) -> usize {
        self.studies.iter().filter(|s| s.labels.is_some()).count()
    }
}

/// Train, validation and test studies (indices into `Dataset::studies`), each sorted. Pretraining
/// reads the training studies only; probes train on them, are chosen on validation and reported on test.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StudySplit {
    pub train: Vec<usize>,
    pub validation: Vec<usize>,
    pub test: Vec<usize>,
}

impl StudySplit {
    /// Every image of the training studies (indices into the index), sorted: what pretraining reads.
    pub fn training_images(&self, studies: &[Study]) -> Vec<usize> {
        let mut images: Vec<usize> = self.train.iter().flat_map(|&i| studies[i].images.iter().copied()).collect();
        images.sort_unstable();
        images
    }

    /// The split's sides by name, in the order train, validation, test.
    pub fn sides(&self) -> [(&'static str, &[usize]); 3] {
        [("train", &self.train), ("validation", &self.validation), ("test", &self.test)]
    }
}

/// Splits studies so that about `test_fraction` of them are in test and about `validation_fraction`
/// of the rest in validation, keeping every patient's studies together (a study without PatientID is
/// its own group). Deterministic in `seed`, and independent of anything else (world size, the
/// pretraining seed).
pub fn split_studies(
    studies: &[Study],
    test_fraction: f64,
    validation_fraction: f64,
    seed: u64,
) -> Result<StudySplit, DatasetError> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(DatasetError::TestFraction(test_fraction));
    }
    if !(0.0..1.0).contains(&validation_fraction) {
        return Err(DatasetError::ValidationFraction(validation_fraction));
    }
    let groups = patient_groups(studies);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); groups.iter().max().map_or(0, |&g| g + 1)];
    for (i, &g) in groups.iter().enumerate() {
        members[g].push(i);
    }
    members.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let test_target = (test_fraction * studies.len() as f64).round() as usize;
    let validation_target =
        (validation_fraction * (studies.len() - test_target.min(studies.len())) as f64).round() as usize;
    let (mut train, mut validation, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for group in members {
        if test.len() + group.len() <= test_target || (test.is_empty() && test_target > 0) {
            test.extend(group);
        } else if validation.len() + group.len() <= validation_target
            || (validation.is_empty() && validation_target > 0)
        {
            validation.extend(group);
        } else {
            train.extend(group);
        }
    }
    train.sort_unstable();
    validation.sort_unstable();
    test.sort_unstable();
    let split = StudySplit { train, validation, test };
    verify_split(&split, studies)?;
    Ok(split)
}

/// Each study's group (0, 1, ...): studies of one patient share a group; a study without PatientID is
/// a group of its own. The unit of the split and of the bootstrap.
pub fn patient_groups(studies: &[Study]) -> Vec<usize> {
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    studies
        .iter()
        .map(|s| {
            let key = match &s.patient {
                Some(p) => format!("patient:{p}"),
                None => format!("study:{}", s.uid),
            };
            let next = ids.len();
            *ids.entry(key).or_insert(next)
        })
        .collect()
}

/// No study and no patient on two sides.
pub fn verify_split(split: &StudySplit, studies: &[Study]) -> Result<(), DatasetError> {
    let mut side_of_study: BTreeMap<&str, &str> = BTreeMap::new();
    let mut side_of_patient: BTreeMap<&str, (&str, usize)> = BTreeMap::new();
    for (side, members) in split.sides() {
        for &i in members {
            let s = &studies[i];
            // Two entries of one study UID must not straddle the split either.
            if side_of_study.insert(s.uid.as_str(), side).is_some_and(|other| other != side) {
                return Err(DatasetError::StudyLeak { study: s.uid.clone() });
            }
            if let Some(p) = &s.patient {
                match side_of_patient.get(p.as_str()) {
                    Some(&(other, j)) if other != side => {
                        return Err(DatasetError::PatientLeak {
                            patient: p.clone(),
                            first_side: other,
                            first_study: studies[j].uid.clone(),
                            second_side: side,
                            second_study: s.uid.clone(),
                        })
                    }
                    Some(_) => {}
                    None => {
                        side_of_patient.insert(p.as_str(), (side, i));
                    }
                }
            }
        }
    }
    Ok(())
}

/// One slot of an epoch: an image (index into the index) and its occurrence in the epoch (0 the first
/// time; a padded epoch shows some images again, and each occurrence gets its own views).
pub type Slot = (usize, u32);

/// The global order of one epoch: `steps x batch_size` slots, global batch t being slots
/// [t B, (t + 1) B). The training images are shuffled from (seed, epoch) alone, so the order is the
/// same for any number of workers; `Drop` leaves out the last partial batch (a different few images
/// each epoch), `Pad` completes it from the start of the order.
pub fn epoch_order(
    images: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    policy: ShardPolicy,
) -> Result<Vec<Slot>, DatasetError> {
    if batch_size == 0 || (policy == ShardPolicy::Drop && images.len() < batch_size) || images.is_empty() {
        return Err(DatasetError::TooFewImages { images: images.len(), batch_size });
    }
    let mut order: Vec<usize> = images.to_vec();
    order.sort_unstable();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch.wrapping_add(1));
    order.shuffle(&mut rng);
    let steps = match policy {
        ShardPolicy::Drop => order.len() / batch_size,
        ShardPolicy::Pad => order.len().div_ceil(batch_size),
    };
    let n = order.len();
    Ok((0..steps * batch_size).map(|k| (order[k % n], (k / n) as u32)).collect())
}

/// `rank`'s slots of an epoch's global order: its `batch_size / world_size` slots of every global
/// batch, batch after batch.
pub fn rank_slots(order: &[Slot], batch_size: usize, world_size: usize, rank: usize) -> Vec<Slot> {
    let local = batch_size / world_size.max(1);
    order.chunks(batch_size).flat_map(|batch| batch[rank * local..(rank + 1) * local].iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn studies(n: usize, patients: usize) -> Vec<Study> {
        let mut next_image = 0;
        (0..n)
            .map(|i| {
                let k = 1 + i % 3;
                let images = (next_image..next_image + k).collect();
                next_image += k;
                Study {
                    uid: format!("s{i}"),
                    patient: (i % 4 != 3).then(|| format!("p{}", i % patients)),
                    images,
                    labels: None,
                }
            })
            .collect()
    }

    #[test]
    fn split_is_deterministic_near_the_fractions_and_keeps_patients_together() {
        let s = studies(200, 60);
        let a = split_studies(&s, 0.15, 0.15, 7).unwrap();
        assert_eq!(a, split_studies(&s, 0.15, 0.15, 7).unwrap());
        assert_ne!(a, split_studies(&s, 0.15, 0.15, 8).unwrap());
        assert_eq!(a.train.len() + a.validation.len() + a.test.len(), 200);
        assert!((25..=35).contains(&a.test.len()), "{}", a.test.len());
        assert!((20..=32).contains(&a.validation.len()), "{}", a.validation.len());
        for (side, members) in a.sides() {
            let patients: BTreeSet<_> = members.iter().filter_map(|&i| s[i].patient.clone()).collect();
            for (other, theirs) in a.sides() {
                if other != side {
                    assert!(theirs.iter().all(|&i| s[i].patient.as_ref().is_none_or(|p| !patients.contains(p))));
                }
            }
        }
        // No validation side when none is asked for; the test side does not move.
        let none = split_studies(&s, 0.15, 0.0, 7).unwrap();
        assert!(none.validation.is_empty());
        assert_eq!(none.test, a.test);
        assert!(matches!(split_studies(&s, 0.15, 1.0, 7), Err(DatasetError::ValidationFraction(_))));
    }

    #[test]
    fn verification_catches_a_leak_put_there_on_purpose() {
        let s = studies(40, 10);
        let mut split = split_studies(&s, 0.2, 0.2, 1).unwrap();
        // Move one study of a test patient into train: the patient now straddles the split.
        let victim = *split.test.iter().find(|&&i| s[i].patient.is_some()).unwrap();
        // Patients here have three or four studies each, so the victim has a sibling in test.
        let sibling = (0..s.len())
            .find(|&j| j != victim && s[j].patient == s[victim].patient && split.test.contains(&j))
            .expect("a patient with several studies in test");
        let mut leaky = split.clone();
        leaky.test.retain(|&i| i != sibling);
        leaky.validation.push(sibling);
        assert!(matches!(verify_split(&leaky, &s), Err(DatasetError::PatientLeak { .. })));
        // The same study on two sides.
        split.train.push(split.test[0]);
        assert!(matches!(verify_split(&split, &s), Err(DatasetError::StudyLeak { .. })));
    }

    #[test]
    fn the_global_order_is_a_reshuffled_permutation_and_ranks_slice_every_batch() {
        let images: Vec<usize> = (0..50).map(|i| i * 3).collect();
        let order = epoch_order(&images, 8, 3, 0, ShardPolicy::Drop).unwrap();
        assert_eq!(order.len(), 48, "6 full batches; the last 2 images sit this epoch out");
        assert!(order.iter().all(|&(_, occurrence)| occurrence == 0));
        let distinct: BTreeSet<usize> = order.iter().map(|&(i, _)| i).collect();
        assert_eq!(distinct.len(), 48);
        // The input's order does not matter, the epoch does.
        let mut reversed = images.clone();
        reversed.reverse();
        assert_eq!(order, epoch_order(&reversed, 8, 3, 0, ShardPolicy::Drop).unwrap());
        assert_ne!(order, epoch_order(&images, 8, 3, 1, ShardPolicy::Drop).unwrap());
        assert_ne!(order, epoch_order(&images, 8, 4, 0, ShardPolicy::Drop).unwrap());
        // Slices of every world size put the same images in the same global batch, rank after rank.
        for world in [1, 2, 4, 8] {
            let slices: Vec<Vec<Slot>> = (0..world).map(|r| rank_slots(&order, 8, world, r)).collect();
            for step in 0..6 {
                let local = 8 / world;
                let batch: Vec<Slot> =
                    slices.iter().flat_map(|s| s[step * local..(step + 1) * local].iter().copied()).collect();
                assert_eq!(batch, order[step * 8..(step + 1) * 8], "world {world}, step {step}");
            }
        }
        // Padding fills the last batch with second occurrences of the first images.
        let padded = epoch_order(&images, 8, 3, 0, ShardPolicy::Pad).unwrap();
        assert_eq!(padded.len(), 56);
        assert_eq!(padded[..50].iter().map(|&(i, _)| i).collect::<BTreeSet<_>>().len(), 50);
        assert_eq!(&padded[50..], &padded[..6].iter().map(|&(i, _)| (i, 1)).collect::<Vec<_>>()[..]);
        assert!(matches!(
            epoch_order(&images[..5], 8, 3, 0, ShardPolicy::Drop),
            Err(DatasetError::TooFewImages { .. })
        ));
        assert_eq!(epoch_order(&images[..5], 8, 3, 0, ShardPolicy::Pad).unwrap().len(), 8);
    }
}
