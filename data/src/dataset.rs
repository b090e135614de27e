//! The dataset as the job sees it: images grouped into studies (and patients), labels joined in,
//! the train/test split at study and patient level, and the per-epoch shards of the training studies.
//! Owns the no-leakage check: no study and no patient may fall on both sides of the split.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

pub use simclr_common::config::ShardPolicy;

use crate::index::DatasetIndex;
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
    #[error("leak: patient {patient} has study {train_study} in train and study {test_study} in test")]
    PatientLeak { patient: String, train_study: String, test_study: String },
    #[error("test fraction {0} is not in (0, 1)")]
    TestFraction(f64),
    #[error("world size {world_size} exceeds the {studies} training studies: some ranks would get no data")]
    TooFewStudies { world_size: usize, studies: usize },
    #[error("images of study {study} disagree on their labels in {path}")]
    InconsistentStudy { study: String, path: PathBuf },
}

impl Dataset {
    /// Groups the index's images into studies and joins the labels.
    pub fn assemble(index: DatasetIndex, labels: &LabelTable) -> Result<Dataset, DatasetError> {
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
                LabelTable::Plain { images: table, path, .. } => {
                    let mut found: Option<Vec<f32>> = None;
                    for &i in &images {
                        let key = &index.images[i].path;
                        if let Some(values) = table.get(key) {
                            matched_rows.insert(key.display().to_string());
                            match &found {
                                Some(v) if v != values => {
                                    return Err(DatasetError::InconsistentStudy {
                                        study: uid.clone(),
                                        path: path.clone(),
                                    })
                                }
                                _ => found = Some(values.clone()),
                            }
                        }
                    }
                    found
                }
                LabelTable::Unlabelled => None,
            };
            studies.push(Study { uid, patient, images, labels });
        }
        let orphan_label_rows = match labels {
            LabelTable::Siim { studies: table, .. } => {
                table.keys().filter(|k| !matched_rows.contains(*k)).map(|k| format!("{k}_study")).collect()
            }
            LabelTable::Plain { images: table, .. } => {
                table.keys().map(|k| k.display().to_string()).filter(|k| !matched_rows.contains(k)).collect()
            }
            LabelTable::Unlabelled => Vec::new(),
        };
        Ok(Dataset { index, label_columns: labels.columns().to_vec(), studies, orphan_label_rows })
    }

    pub fn labelled_studies(&self) -> usize {
        self.studies.iter().filter(|s| s.labels.is_some()).count()
    }
}

/// Train and test studies (indices into `Dataset::studies`), sorted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StudySplit {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// Splits studies so that about `test_fraction` of them are in test, keeping every patient's studies
/// together (a study without PatientID is its own group). Deterministic in `seed`.
pub fn split_studies(studies: &[Study], test_fraction: f64, seed: u64) -> Result<StudySplit, DatasetError> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(DatasetError::TestFraction(test_fraction));
    }
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, s) in studies.iter().enumerate() {
        let key = match &s.patient {
            Some(p) => format!("patient:{p}"),
            None => format!("study:{}", s.uid),
        };
        groups.entry(key).or_default().push(i);
    }
    let mut groups: Vec<Vec<usize>> = groups.into_values().collect();
    groups.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let target = (test_fraction * studies.len() as f64).round() as usize;
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for group in groups {
        if test.len() + group.len() <= target || (test.is_empty() && target > 0) {
            test.extend(group);
        } else {
            train.extend(group);
        }
    }
    train.sort_unstable();
    test.sort_unstable();
    let split = StudySplit { train, test };
    verify_split(&split, studies)?;
    Ok(split)
}

/// No study and no patient on both sides.
pub fn verify_split(split: &StudySplit, studies: &[Study]) -> Result<(), DatasetError> {
    let test: BTreeSet<usize> = split.test.iter().copied().collect();
    let mut patients_in_train: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in &split.train {
        if test.contains(&i) {
            return Err(DatasetError::StudyLeak { study: studies[i].uid.clone() });
        }
        if let Some(p) = &studies[i].patient {
            patients_in_train.insert(p, i);
        }
    }
    // Two entries of one study UID must not straddle the split either.
    let train_uids: BTreeSet<&str> = split.train.iter().map(|&i| studies[i].uid.as_str()).collect();
    if let Some(&i) = split.test.iter().find(|&&i| train_uids.contains(studies[i].uid.as_str())) {
        return Err(DatasetError::StudyLeak { study: studies[i].uid.clone() });
    }
    for &i in &split.test {
        if let Some(p) = &studies[i].patient {
            if let Some(&t) = patients_in_train.get(p.as_str()) {
                return Err(DatasetError::PatientLeak {
                    patient: p.clone(),
                    train_study: studies[t].uid.clone(),
                    test_study: studies[i].uid.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Each rank's images (indices into the index) for one epoch. Studies are dealt whole, in an order
/// shuffled from (seed, epoch), each to the rank with the fewest images so far; each rank's images are
/// then shuffled and brought to a common length by `policy`. Depends only on its arguments, so every
/// process computes the same shards.
pub fn epoch_shards(
    studies: &[&Study],
    world_size: usize,
    seed: u64,
    epoch: u64,
    policy: ShardPolicy,
) -> Result<Vec<Vec<usize>>, DatasetError> {
    if world_size == 0 || world_size > studies.len() {
        return Err(DatasetError::TooFewStudies { world_size, studies: studies.len() });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch.wrapping_add(1));
    let mut order: Vec<usize> = (0..studies.len()).collect();
    order.shuffle(&mut rng);
    let mut shards: Vec<Vec<usize>> = vec![Vec::new(); world_size];
    for i in order {
        let rank = (0..world_size).min_by_key(|&r| (shards[r].len(), r)).unwrap_or(0);
        shards[rank].extend(&studies[i].images);
    }
    for shard in &mut shards {
        shard.shuffle(&mut rng);
    }
    let (min, max) = shards.iter().fold((usize::MAX, 0), |(lo, hi), s| (lo.min(s.len()), hi.max(s.len())));
    for shard in &mut shards {
        match policy {
            ShardPolicy::Drop => shard.truncate(min),
            ShardPolicy::Pad => {
                let own = shard.clone();
                shard.extend(own.iter().cycle().take(max - own.len()));
            }
        }
    }
    Ok(shards)
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
    fn split_is_deterministic_near_the_fraction_and_keeps_patients_together() {
        let s = studies(200, 60);
        let a = split_studies(&s, 0.15, 7).unwrap();
        assert_eq!(a, split_studies(&s, 0.15, 7).unwrap());
        assert_ne!(a, split_studies(&s, 0.15, 8).unwrap());
        assert_eq!(a.train.len() + a.test.len(), 200);
        assert!((25..=35).contains(&a.test.len()), "{}", a.test.len());
        let test_patients: BTreeSet<_> = a.test.iter().filter_map(|&i| s[i].patient.clone()).collect();
        assert!(a.train.iter().all(|&i| s[i].patient.as_ref().is_none_or(|p| !test_patients.contains(p))));
    }

    #[test]
    fn verification_catches_a_leak_put_there_on_purpose() {
        let s = studies(40, 10);
        let mut split = split_studies(&s, 0.2, 1).unwrap();
        // Move one study of a test patient into train: the patient now straddles the split.
        let victim = *split.test.iter().find(|&&i| s[i].patient.is_some()).unwrap();
        // Patients here have three or four studies each, so the victim has a sibling in test.
        let sibling = (0..s.len())
            .find(|&j| j != victim && s[j].patient == s[victim].patient && split.test.contains(&j))
            .expect("a patient with several studies in test");
        let mut leaky = split.clone();
        leaky.test.retain(|&i| i != sibling);
        leaky.train.push(sibling);
        assert!(matches!(verify_split(&leaky, &s), Err(DatasetError::PatientLeak { .. })));
        // The same study on both sides.
        split.train.push(split.test[0]);
        assert!(matches!(verify_split(&split, &s), Err(DatasetError::StudyLeak { .. })));
    }

    #[test]
    fn shards_are_disjoint_equal_deterministic_and_reshuffled_each_epoch() {
        let s = studies(23, 23);
        let refs: Vec<&Study> = s.iter().collect();
        let total: usize = s.iter().map(|x| x.images.len()).sum();
        for world_size in [1, 2, 3, 5, 7] {
            let shards = epoch_shards(&refs, world_size, 3, 0, ShardPolicy::Drop).unwrap();
            assert_eq!(shards, epoch_shards(&refs, world_size, 3, 0, ShardPolicy::Drop).unwrap());
            let len = shards[0].len();
            assert!(shards.iter().all(|x| x.len() == len));
            let all: BTreeSet<usize> = shards.iter().flatten().copied().collect();
            assert_eq!(all.len(), len * world_size, "an image on two ranks");
            // Studies are dealt whole (at most 3 images), so a rank is at most 3 short of the largest.
            assert!(total - len * world_size <= 3 * world_size);
            let padded = epoch_shards(&refs, world_size, 3, 0, ShardPolicy::Pad).unwrap();
            let covered: BTreeSet<usize> = padded.iter().flatten().copied().collect();
            assert_eq!(covered.len(), total, "padding must keep every image");
            assert!(padded.iter().all(|x| x.len() == padded[0].len()));
        }
        let e0 = epoch_shards(&refs, 3, 3, 0, ShardPolicy::Drop).unwrap();
        let e1 = epoch_shards(&refs, 3, 3, 1, ShardPolicy::Drop).unwrap();
        assert_ne!(e0, e1);
        assert!(matches!(epoch_shards(&refs, 24, 3, 0, ShardPolicy::Drop), Err(DatasetError::TooFewStudies { .. })));
    }
}
