//! Metrics of a binary classifier's scores, as the probe sweep reports them: accuracy, ROC AUC,
//! average precision (the Kaggle study-level metric's building block), the ROC curve, study-level
//! predictions (the mean of a study's image scores) and percentile bootstrap intervals that resample
//! whole clusters (studies, patients). Pure Rust in f64, so that the coordinator and the workers compute them alike.
//!
//! Ties are handled as scikit-learn does: tied scores share one threshold, so the AUC counts a tied
//! positive-negative pair as half, and the average precision steps once per distinct score.

use rand::{Rng, SeedableRng};

/// Share of `scores` on the right side of `threshold` (score >= threshold predicts positive).
pub fn accuracy(scores: &[f64], labels: &[bool], threshold: f64) -> f64 {
    assert_eq!(scores.len(), labels.len());
    if scores.is_empty() {
        return f64::NAN;
    }
    let right = scores.iter().zip(labels).filter(|(s, y)| (**s >= threshold) == **y).count();
    right as f64 / scores.len() as f64
}

/// Indices of `scores` by decreasing score.
fn by_decreasing_score(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

/// The ROC curve: (false positive rate, true positive rate) at every distinct threshold, from (0, 0) to
/// (1, 1). None when one of the classes is absent.
pub fn roc_curve(scores: &[f64], labels: &[bool]) -> Option<Vec<(f64, f64)>> {
    assert_eq!(scores.len(), labels.len());
    let positives = labels.iter().filter(|&&y| y).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let order = by_decreasing_score(scores);
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0usize, 0usize);
    for (k, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_tie = order.get(k + 1).is_none_or(|&j| scores[j] != scores[i]);
        if last_of_tie {
            points.push((fp as f64 / negatives as f64, tp as f64 / positives as f64));
        }
    }
    Some(points)
}

/// Area under the ROC curve (trapezoids over the distinct thresholds, which counts tied pairs as
/// half). None when one of the classes is absent.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let curve = roc_curve(scores, labels)?;
    Some(curve.windows(2).map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0).sum())
}

/// Average precision: the sum over distinct thresholds of (recall gained) x (precision there). None
/// without positives.
pub fn average_precision(scores: &[f64], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len());
    let positives = labels.iter().filter(|&&y| y).count();
    if positives == 0 {
        return None;
    }
    let order = by_decreasing_score(scores);
    let (mut tp, mut seen, mut last_tp, mut ap) = (0usize, 0usize, 0usize, 0.0);
    for (k, &i) in order.iter().enumerate() {
        seen += 1;
        tp += usize::from(labels[i]);
        let last_of_tie = order.get(k + 1).is_none_or(|&j| scores[j] != scores[i]);
        if last_of_tie {
            ap += (tp - last_tp) as f64 / positives as f64 * (tp as f64 / seen as f64);
            last_tp = tp;
        }
    }
    Some(ap)
}

/// A 95% percentile bootstrap interval of `metric` over `resamples` resamples (with replacement) of
/// the (score, label) pairs, from `seed`: [`cluster_bootstrap_interval`] with every pair its own cluster.
pub fn bootstrap_interval(
    scores: &[f64],
    labels: &[bool],
    metric: impl Fn(&[f64], &[bool]) -> Option<f64>,
    resamples: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    let own: Vec<u64> = (0..scores.len() as u64).collect();
    cluster_bootstrap_interval(scores, labels, &own, metric, resamples, seed)
}

/// A 95% percentile bootstrap interval of `metric` that resamples whole clusters (with replacement),
/// from `seed`: rows of one cluster (a study's images, a patient's studies) share a label and much of
/// their appearance, so resampling them one by one would pretend to more independent evidence than
/// there is and give too narrow an interval. `clusters[i]` is row i's cluster. Resamples where the
/// metric is undefined (one class drawn only) are skipped; None when fewer than half are usable.
pub fn cluster_bootstrap_interval(
    scores: &[f64],
    labels: &[bool],
    clusters: &[u64],
    metric: impl Fn(&[f64], &[bool]) -> Option<f64>,
    resamples: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    assert_eq!(scores.len(), labels.len());
    assert_eq!(scores.len(), clusters.len());
    if scores.is_empty() || resamples == 0 {
        return None;
    }
    let mut members: std::collections::BTreeMap<u64, Vec<usize>> = std::collections::BTreeMap::new();
    for (i, &c) in clusters.iter().enumerate() {
        members.entry(c).or_default().push(i);
    }
    let members: Vec<Vec<usize>> = members.into_values().collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut s, mut y) = (Vec::with_capacity(scores.len()), Vec::with_capacity(scores.len()));
    let mut values = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        s.clear();
        y.clear();
        for _ in 0..members.len() {
            for &i in &members[rng.gen_range(0..members.len())] {
                s.push(scores[i]);
                y.push(labels[i]);
            }
        }
        if let Some(v) = metric(&s, &y) {
            values.push(v);
        }
    }
    if values.len() * 2 < resamples {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((q * (values.len() - 1) as f64).round() as usize).min(values.len() - 1)];
    Some((at(0.025), at(0.975)))
}

/// Study-level predictions from image-level ones: per study (in study order), the mean of its images'
/// scores, its label (a study-level label: its images share it; the first image's), and its cluster.
pub fn by_study(scores: &[f64], labels: &[bool], studies: &[u64], clusters: &[u64]) -> (Vec<f64>, Vec<bool>, Vec<u64>) {
    let mut acc: std::collections::BTreeMap<u64, (f64, usize, bool, u64)> = std::collections::BTreeMap::new();
    for i in 0..scores.len() {
        let e = acc.entry(studies[i]).or_insert((0.0, 0, labels[i], clusters[i]));
        e.0 += scores[i];
        e.1 += 1;
    }
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for (sum, n, label, cluster) in acc.into_values() {
        out.0.push(sum / n as f64);
        out.1.push(label);
        out.2.push(cluster);
    }
    out
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    if values.len() == 1 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AUC by its definition: the share of (positive, negative) pairs ordered right, ties half.
    fn auc_by_pairs(scores: &[f64], labels: &[bool]) -> f64 {
        let (mut sum, mut pairs) = (0.0, 0.0);
        for (i, &yi) in labels.iter().enumerate() {
            for (j, &yj) in labels.iter().enumerate() {
                if yi && !yj {
                    pairs += 1.0;
                    sum += match scores[i].total_cmp(&scores[j]) {
                        std::cmp::Ordering::Greater => 1.0,
                        std::cmp::Ordering::Equal => 0.5,
                        std::cmp::Ordering::Less => 0.0,
                    };
                }
            }
        }
        sum / pairs
    }

    /// Average precision by its definition: the mean over positives of the precision among everything
    /// scored at least as high.
    fn ap_by_positives(scores: &[f64], labels: &[bool]) -> f64 {
        let positives: Vec<usize> = (0..labels.len()).filter(|&i| labels[i]).collect();
        let precision = |t: f64| {
            let above: Vec<usize> = (0..scores.len()).filter(|&j| scores[j] >= t).collect();
            above.iter().filter(|&&j| labels[j]).count() as f64 / above.len() as f64
        };
        positives.iter().map(|&i| precision(scores[i])).sum::<f64>() / positives.len() as f64
    }

    #[test]
    fn known_values() {
        // scikit-learn's documented example: roc_auc_score = 0.75, average_precision_score = 0.8333...
        let scores = [0.1, 0.4, 0.35, 0.8];
        let labels = [false, false, true, true];
        assert!((roc_auc(&scores, &labels).unwrap() - 0.75).abs() < 1e-12);
        assert!((average_precision(&scores, &labels).unwrap() - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(accuracy(&scores, &labels, 0.5), 0.75);
        assert_eq!(roc_auc(&scores, &[true; 4]), None);
        assert_eq!(average_precision(&scores, &[false; 4]), None);
    }

    #[test]
    fn auc_and_ap_agree_with_their_definitions_with_and_without_ties() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for case in 0..200 {
            let n = rng.gen_range(2..60);
            // Coarse scores in half the cases, so that ties are common.
            let levels = if case % 2 == 0 { 5 } else { 1_000_000 };
            let scores: Vec<f64> = (0..n).map(|_| rng.gen_range(0..levels) as f64 / levels as f64).collect();
            let labels: Vec<bool> = (0..n).map(|_| rng.gen_bool(0.4)).collect();
            let has_both = labels.iter().any(|&y| y) && labels.iter().any(|&y| !y);
            if has_both {
                let (got, want) = (roc_auc(&scores, &labels).unwrap(), auc_by_pairs(&scores, &labels));
                assert!((got - want).abs() < 1e-12, "case {case}: auc {got} vs {want}");
            }
            if labels.iter().any(|&y| y) {
                let (got, want) = (average_precision(&scores, &labels).unwrap(), ap_by_positives(&scores, &labels));
                assert!((got - want).abs() < 1e-12, "case {case}: ap {got} vs {want}");
            }
        }
    }

    #[test]
    fn the_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_data() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let make = |n: usize, rng: &mut rand_chacha::ChaCha8Rng| {
            let labels: Vec<bool> = (0..n).map(|_| rng.gen_bool(0.5)).collect();
            let scores: Vec<f64> =
                labels.iter().map(|&y| f64::from(u8::from(y)) * 0.5 + rng.gen_range(0.0..1.0)).collect();
            (scores, labels)
        };
        let (s, y) = make(100, &mut rng);
        let auc = roc_auc(&s, &y).unwrap();
        let (lo, hi) = bootstrap_interval(&s, &y, roc_auc, 500, 3).unwrap();
        assert!(lo < auc && auc < hi, "{lo} < {auc} < {hi}");
        // Deterministic for a seed.
        assert_eq!(bootstrap_interval(&s, &y, roc_auc, 500, 3), Some((lo, hi)));
        let (s, y) = make(2000, &mut rng);
        let (lo2, hi2) = bootstrap_interval(&s, &y, roc_auc, 500, 3).unwrap();
        assert!(hi2 - lo2 < (hi - lo) / 2.0, "{lo2}..{hi2} against {lo}..{hi}");
    }

    #[test]
    fn study_level_predictions_and_the_cluster_bootstrap_on_a_hand_computed_case() {
        // Three studies: A (2 images, positive), B (3 images, negative), C (1 image, positive); A and B
        // belong to one patient (cluster 0), C to another (cluster 1).
        let scores = [0.9, 0.5, 0.2, 0.4, 0.6, 0.3];
        let labels = [true, true, false, false, false, true];
        let studies = [10, 10, 20, 20, 20, 30];
        let clusters = [0, 0, 0, 0, 0, 1];
        let (s, y, c) = by_study(&scores, &labels, &studies, &clusters);
        assert_eq!(y, vec![true, false, true]);
        assert_eq!(c, vec![0, 0, 1]);
        assert!((s[0] - 0.7).abs() < 1e-12 && (s[1] - 0.4).abs() < 1e-12 && (s[2] - 0.3).abs() < 1e-12, "{s:?}");
        // Study level: positives 0.7 and 0.3 against the negative 0.4: one pair of two right.
        assert_eq!(roc_auc(&s, &y), Some(0.5));
        // AP: ranked 0.7 (+), 0.4 (-), 0.3 (+): precisions 1 and 2/3 at the positives.
        assert!((average_precision(&s, &y).unwrap() - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        // Image level: 6 pairs, right: 0.9 > all 3, 0.5 > 0.2, 0.4 (2), 0.3 > 0.2 (1): 6 of 9.
        assert!((roc_auc(&scores, &labels).unwrap() - 6.0 / 9.0).abs() < 1e-12);
        // Two clusters: a resample is cluster 1 twice (positives only: skipped), cluster 0 twice (A
        // against B: AUC 1) or one of each (AUC 0.5), so the interval's ends are among those two.
        let (lo, hi) = cluster_bootstrap_interval(&s, &y, &c, roc_auc, 400, 1).unwrap();
        let possible = [roc_auc(&s, &y).unwrap(), roc_auc(&s[..2], &y[..2]).unwrap()];
        assert!(possible.contains(&lo) && possible.contains(&hi), "{lo} {hi}");
        // Resampling the six images one by one gives a narrower interval than resampling patients
        // (a case where images of one patient are alike): clusters make it honest.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (mut s, mut y, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for patient in 0..30u64 {
            let label = patient % 2 == 0;
            let level = rng.gen_range(0.0..1.0) + if label { 0.3 } else { 0.0 };
            for _ in 0..8 {
                s.push(level + rng.gen_range(0.0..0.05));
                y.push(label);
                c.push(patient);
            }
        }
        let (a, b) = bootstrap_interval(&s, &y, roc_auc, 500, 2).unwrap();
        let (ca, cb) = cluster_bootstrap_interval(&s, &y, &c, roc_auc, 500, 2).unwrap();
        assert!(cb - ca > 1.5 * (b - a), "clustered {ca}..{cb}, rows {a}..{b}");
    }

    #[test]
    fn mean_and_sample_deviation() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[2.0]), (2.0, 0.0));
    }
}
