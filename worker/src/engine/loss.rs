//! NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, eq. 1 and
//! Algorithm 1): every view (anchor) must pick out its partner view among all other views of the batch,
//! by cosine similarity divided by the temperature tau; the loss is the mean over all 2N anchors, which
//! is the paper's symmetric average over both orders of each pair.
//!
//! The anchors need not be the whole batch: a worker holds its own views (anchors) and the gathered
//! global batch (keys), and says where each anchor sits among the keys (its own row, masked out) and
//! where its partner sits. Dividing by the global anchor count (`denominator`) makes the workers' losses
//! add up to the single-process loss, and their gradients too, with no rescaling by the world size.

use tch::{Kind, Tensor};

/// Rows of unit length (zero rows stay zero instead of dividing by zero).
pub fn normalize_rows(z: &Tensor) -> Tensor {
    let norm = z.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12);
    z / norm
}

/// Cosine similarity of every anchor with every key: (n x d, m x d) -> n x m.
pub fn cosine_similarity(anchors: &Tensor, keys: &Tensor) -> Tensor {
    normalize_rows(anchors).matmul(&normalize_rows(keys).transpose(0, 1))
}

/// Where the anchors sit among the keys and where their partners are.
#[derive(Debug, Clone, PartialEq)]
pub struct AnchorRows {
    /// Row of each anchor in the keys (its self-similarity is masked out).
    pub own: Vec<i64>,
    /// Row of each anchor's positive (the other view of the same image).
    pub positive: Vec<i64>,
}

impl AnchorRows {
    /// The standard layout of a batch of `n` images: views 0..n are the first views, n..2n the second
    /// ones, so view i and view (i + n) mod 2n are partners.
    pub fn whole_batch(n: i64) -> AnchorRows {
        AnchorRows::rank_block(n, 0)
    }

    /// One worker's anchors in a rank-major gathered batch: every rank holds `n` images as 2n views
    /// (first views, then second views), so this rank's rows start at `rank * 2n`.
    pub fn rank_block(n: i64, rank: i64) -> AnchorRows {
        let base = rank * 2 * n;
        let own: Vec<i64> = (0..2 * n).map(|i| base + i).collect();
        let positive = (0..2 * n).map(|i| base + (i + n) % (2 * n)).collect();
        AnchorRows { own, positive }
    }
}

/// The similarity matrix with each anchor's own entry set to -inf (`masked_fill`: that entry gets
/// exactly zero gradient), so that neither the softmax nor an argmax can pick it.
pub fn mask_own(similarity: &Tensor, rows: &AnchorRows) -> Tensor {
    let m = similarity.size()[1];
    let device = similarity.device();
    let own = Tensor::from_slice(&rows.own).to_device(device);
    let self_mask = Tensor::arange(m, (Kind::Int64, device)).unsqueeze(0).eq_tensor(&own.unsqueeze(1));
    similarity.masked_fill(&self_mask, f64::NEG_INFINITY)
}

/// NT-Xent of `anchors` against `keys` (their rows named by `rows`), summed over the anchors and
/// divided by `denominator` (the number of anchors in the whole global batch).
pub fn nt_xent(anchors: &Tensor, keys: &Tensor, rows: &AnchorRows, tau: f64, denominator: i64) -> Tensor {
    nt_xent_from_similarity(&cosine_similarity(anchors, keys), rows, tau, denominator)
}

/// The loss from the anchors' similarity matrix (n x m). Each anchor's own entry is replaced by -inf
/// before the softmax (`masked_fill`), so it takes no part in the loss and gets exactly zero gradient.
pub fn nt_xent_from_similarity(similarity: &Tensor, rows: &AnchorRows, tau: f64, denominator: i64) -> Tensor {
    let (n, _) = similarity.size2().expect("a similarity matrix");
    assert_eq!(rows.own.len() as i64, n, "one own row per anchor");
    assert_eq!(rows.positive.len() as i64, n, "one positive row per anchor");
    assert!(tau > 0.0, "temperature must be positive");
    let positive = Tensor::from_slice(&rows.positive).to_device(similarity.device());
    let logits = mask_own(similarity, rows) / tau;
    let positives = logits.gather(1, &positive.unsqueeze(1), false).squeeze_dim(1);
    let per_anchor = logits.logsumexp([1i64].as_slice(), false) - positives;
    per_anchor.sum(similarity.kind()) / denominator as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn random(rows: i64, dim: i64, seed: i64) -> Tensor {
        crate::engine::model::with_torch_seed(seed as u64, || Tensor::randn([rows, dim], (Kind::Double, Device::Cpu)))
    }

    use crate::testing::to_f64 as values;

    /// Equation 1 of the paper, in f64 loops: l(i, j) = -log(exp(s_ij/t) / sum_{k != i} exp(s_ik/t)),
    /// averaged over every anchor i with its partner j.
    fn reference(z: &[Vec<f64>], tau: f64) -> f64 {
        let two_n = z.len();
        let n = two_n / 2;
        let unit: Vec<Vec<f64>> = z
            .iter()
            .map(|v| {
                let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                v.iter().map(|x| x / norm).collect()
            })
            .collect();
        let sim = |a: usize, b: usize| unit[a].iter().zip(&unit[b]).map(|(x, y)| x * y).sum::<f64>();
        let mut total = 0.0;
        for i in 0..two_n {
            let j = (i + n) % two_n;
            let denominator: f64 = (0..two_n).filter(|&k| k != i).map(|k| (sim(i, k) / tau).exp()).sum();
            total += -((sim(i, j) / tau).exp() / denominator).ln();
        }
        total / two_n as f64
    }

    #[test]
    fn matches_the_formula_in_f64() {
        for (n, dim, tau) in [(1, 3, 0.5), (3, 4, 0.1), (5, 7, 1.0)] {
            let z = random(2 * n, dim, 7 + n);
            let rows: Vec<Vec<f64>> = (0..2 * n).map(|r| values(&z.get(r))).collect();
            let ours = nt_xent(&z, &z, &AnchorRows::whole_batch(n), tau, 2 * n).double_value(&[]);
            let want = reference(&rows, tau);
            assert!((ours - want).abs() < 1e-12 * want.abs().max(1.0), "n={n}: {ours} vs {want}");
        }
    }

    #[test]
    fn random_unit_vectors_give_about_ln_2n_minus_1() {
        // In high dimension random directions are nearly orthogonal: every logit is about 0.
        let n = 64;
        let z = random(2 * n, 8192, 3);
        let loss = nt_xent(&z, &z, &AnchorRows::whole_batch(n), 1.0, 2 * n).double_value(&[]);
        let want = ((2 * n - 1) as f64).ln();
        assert!((loss - want).abs() < 0.02, "{loss} vs ln(2N-1) = {want}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (n, dim, tau) = (3, 5, 0.3);
        let z = random(2 * n, dim, 11).set_requires_grad(true);
        let rows = AnchorRows::whole_batch(n);
        let loss = nt_xent(&z, &z, &rows, tau, 2 * n);
        loss.backward();
        let analytic = values(&z.grad());
        let base = z.detach();
        let h = 1e-6;
        for i in 0..(2 * n * dim) {
            let bump = |delta: f64| {
                let zz = base.copy();
                let flat = zz.view([-1]);
                let _ = flat.get(i).g_add_scalar_(delta);
                nt_xent(&zz, &zz, &rows, tau, 2 * n).double_value(&[])
            };
            let numeric = (bump(h) - bump(-h)) / (2.0 * h);
            assert!(
                (numeric - analytic[i as usize]).abs() < 1e-7,
                "element {i}: {numeric} vs {}",
                analytic[i as usize]
            );
        }
    }

    #[test]
    fn the_masked_self_similarity_gets_exactly_zero_gradient() {
        let n = 4;
        let z = random(2 * n, 6, 5);
        let sim = cosine_similarity(&z, &z).detach().set_requires_grad(true);
        nt_xent_from_similarity(&sim, &AnchorRows::whole_batch(n), 0.2, 2 * n).backward();
        let grad = sim.grad();
        for i in 0..2 * n {
            assert_eq!(grad.double_value(&[i, i]), 0.0, "diagonal {i}");
        }
        // Every other entry takes part.
        assert!(values(&grad).iter().filter(|g| **g != 0.0).count() as i64 == 2 * n * (2 * n - 1));
    }

    #[test]
    fn per_rank_losses_against_gathered_keys_add_up_to_the_single_process_loss() {
        // Three ranks of two images each; the gathered batch is rank-major.
        let (world, n, dim, tau) = (3i64, 2i64, 5i64, 0.5);
        let per_rank: Vec<Tensor> = (0..world).map(|r| random(2 * n, dim, 100 + r)).collect();
        let keys = Tensor::cat(&per_rank, 0).set_requires_grad(true);
        let total = world * 2 * n;
        let mut sum = Tensor::zeros([], (Kind::Double, Device::Cpu));
        for r in 0..world {
            let anchors = keys.narrow(0, r * 2 * n, 2 * n);
            sum += nt_xent(&anchors, &keys, &AnchorRows::rank_block(n, r), tau, total);
        }
        sum.backward();
        let distributed_grad = keys.grad().copy();

        // The same batch in one process: images in the standard layout (all first views, then all
        // second views), which is a permutation of the rank-major rows.
        let first: Vec<Tensor> = per_rank.iter().map(|t| t.narrow(0, 0, n)).collect();
        let second: Vec<Tensor> = per_rank.iter().map(|t| t.narrow(0, n, n)).collect();
        let whole = Tensor::cat(&[Tensor::cat(&first, 0), Tensor::cat(&second, 0)], 0).set_requires_grad(true);
        let single = nt_xent(&whole, &whole, &AnchorRows::whole_batch(world * n), tau, total);
        single.backward();
        assert!((sum.double_value(&[]) - single.double_value(&[])).abs() < 1e-12);
        // Map the single-process gradient back to rank-major rows and compare.
        let g = whole.grad();
        for r in 0..world {
            for i in 0..2 * n {
                let single_row = if i < n { r * n + i } else { world * n + r * n + (i - n) };
                let a = values(&distributed_grad.get(r * 2 * n + i));
                let b = values(&g.get(single_row));
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < 1e-12, "rank {r} view {i}: {a:?} vs {b:?}");
                }
            }
        }
    }
}
