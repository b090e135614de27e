//! The weighted k-nearest-neighbour classifier that watches pretraining (`[pretrain.monitor]`): each
//! query's score for a binary label is the weighted share of positives among its k most similar
//! training images, similarity the cosine of their features and each neighbour's weight
//! exp(similarity / temperature), as in InstDisc (Wu et al. 2018) and solo-learn's kNN monitor.

use tch::{Device, Kind, Tensor};

/// Scores (M, in [0, 1]) of `queries` (M x D) against `keys` (N x D) labelled `labels` (N, 0 or 1).
/// Queries are processed in blocks so that memory stays O(block x N).
pub fn knn_scores(keys: &Tensor, labels: &Tensor, queries: &Tensor, k: usize, temperature: f64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let n = keys.size()[0];
    let m = queries.size()[0];
    if n == 0 || m == 0 {
        return Tensor::full([m], 0.5, (Kind::Float, Device::Cpu));
    }
    let k = (k as i64).min(n);
    let normalise = |x: &Tensor| {
        let x = x.to_kind(Kind::Float);
        let norm = x.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
        x / norm
    };
    let keys = normalise(keys);
    let queries = normalise(queries);
    let labels = labels.to_kind(Kind::Float).to_device(keys.device());
    const BLOCK: i64 = 1024;
    let mut out = Vec::new();
    let mut start = 0;
    while start < m {
        let len = BLOCK.min(m - start);
        let sim = queries.narrow(0, start, len).matmul(&keys.transpose(0, 1));
        let (top, index) = sim.topk(k, 1, true, true);
        let weights = (top / temperature).exp();
        let votes = labels.index_select(0, &index.flatten(0, -1)).view([len, k]);
        out.push(
            (&weights * votes).sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
                / weights.sum_dim_intlist([1i64].as_slice(), false, Kind::Float),
        );
        start += len;
    }
    Tensor::cat(&out, 0).to_device(Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_the_weighted_share_of_positive_neighbours() {
        // Keys on the unit circle at angles 0, 0.1, 0.5, 2.0 (labels 1, 0, 1, 0); a query at angle 0.05
        // with k = 3 meets the first three. Reference in f64: weights exp(cos(0.05 - a) / T).
        let angles = [0.0f64, 0.1, 0.5, 2.0];
        let labels = [1.0f32, 0.0, 1.0, 0.0];
        let keys: Vec<f32> = angles.iter().flat_map(|a| [a.cos() as f32, a.sin() as f32]).collect();
        let keys = Tensor::from_slice(&keys).view([4, 2]) * 3.0; // scale: cosine ignores it
        let q = 0.05f64;
        let query = Tensor::from_slice(&[q.cos() as f32, q.sin() as f32]).view([1, 2]);
        let t = 0.07;
        let w: Vec<f64> = angles[..3].iter().map(|a| ((q - a).cos() / t).exp()).collect();
        let expected = (w[0] + w[2]) / (w[0] + w[1] + w[2]);
        let got = knn_scores(&keys, &Tensor::from_slice(&labels), &query, 3, t).double_value(&[0]);
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        // k larger than the keys: all of them.
        let all = knn_scores(&keys, &Tensor::from_slice(&labels), &query, 50, t).double_value(&[0]);
        let w4: Vec<f64> = angles.iter().map(|a| ((q - a).cos() / t).exp()).collect();
        let expected = (w4[0] + w4[2]) / w4.iter().sum::<f64>();
        assert!((all - expected).abs() < 1e-5, "{all} vs {expected}");
    }
}
