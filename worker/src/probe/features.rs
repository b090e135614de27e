//! What the probe phase moves between ranks: the frozen encoder, broadcast from one rank with a
//! checksum every rank verifies, and the features each rank computes for its share of the images,
//! gathered so that every rank holds the whole training and test sets.

use tch::{nn, Kind, Tensor};

use crate::comm::{f32s_to_u64, u64_to_f32s, Collective};
use crate::engine::model::HEAD_PREFIX;

/// CRC-32 over every encoder variable (names and float32 bytes, in name order), computed one variable
/// at a time; the projection head is left out, as it is dropped after pretraining.
pub fn encoder_checksum(vs: &nn::VarStore) -> u64 {
    let mut crc = crc32fast::Hasher::new();
    for (name, t) in encoder_variables(vs) {
        crc.update(name.as_bytes());
        let values = Vec::<f32>::try_from(t.detach().to_kind(Kind::Float).flatten(0, -1)).unwrap_or_default();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        crc.update(&bytes);
    }
    u64::from(crc.finalize())
}

fn encoder_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> =
        vs.variables().into_iter().filter(|(name, _)| !name.starts_with(HEAD_PREFIX)).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Replaces every rank's encoder weights (BatchNorm statistics included) with `root`'s, then checks
/// that every rank computes `root`'s checksum. Returns the checksum.
pub fn broadcast_encoder(vs: &nn::VarStore, collective: &dyn Collective, root: usize) -> Result<u64, String> {
    let expected = if collective.rank() == root { encoder_checksum(vs) } else { 0 };
    for (name, t) in encoder_variables(vs) {
        let got = collective
            .broadcast(&t.detach().to_kind(Kind::Float), root)
            .map_err(|e| format!("broadcasting encoder variable {name}: {e}"))?;
        tch::no_grad(|| t.shallow_clone().copy_(&got));
    }
    let mine = encoder_checksum(vs);
    let announced = Tensor::from_slice(&[u64_to_f32s(expected), u64_to_f32s(mine)].concat()).view([1, 8]);
    let all = collective.all_gather(&announced).map_err(|e| format!("comparing encoder checksums: {e}"))?;
    let all = Vec::<f32>::try_from(all.flatten(0, -1)).map_err(|e| e.to_string())?;
    let want = f32s_to_u64(&all[root * 8..root * 8 + 4]);
    for rank in 0..collective.world_size() {
        let theirs = f32s_to_u64(&all[rank * 8 + 4..rank * 8 + 8]);
        if theirs != want {
            return Err(format!(
                "rank {rank}'s encoder has checksum {theirs:016x} after the broadcast, rank {root}'s {want:016x}"
            ));
        }
    }
    Ok(want)
}

/// Every rank's rows (N_r x d, N_r may differ) concatenated in rank order, on every rank.
pub fn gather_rows(collective: &dyn Collective, rows: &Tensor) -> Result<Tensor, String> {
    let size = rows.size();
    let (n, d) = match size.as_slice() {
        &[n, d] => (n, d),
        other => return Err(format!("gather_rows expects N x d, got {other:?}")),
    };
    let counts = collective
        .all_gather(&Tensor::from_slice(&[n as f32, d as f32]).view([1, 2]))
        .map_err(|e| format!("gathering row counts: {e}"))?;
    let counts = Vec::<f32>::try_from(counts.flatten(0, -1)).map_err(|e| e.to_string())?;
    if let Some(rank) = (0..counts.len() / 2).find(|r| counts[r * 2 + 1] as i64 != d) {
        return Err(format!("rank {rank} has rows of width {}, this rank {d}", counts[rank * 2 + 1]));
    }
    let lengths: Vec<i64> = counts.iter().step_by(2).map(|&c| c as i64).collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let padded = Tensor::zeros([longest, d], (Kind::Float, rows.device()));
    if n > 0 {
        padded.narrow(0, 0, n).copy_(&rows.to_kind(Kind::Float));
    }
    let all = collective.all_gather(&padded).map_err(|e| format!("gathering rows: {e}"))?;
    let parts: Vec<Tensor> =
        lengths.iter().enumerate().map(|(r, &len)| all.narrow(0, r as i64 * longest, len)).collect();
    Ok(Tensor::cat(&parts, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{with_torch_seed, Encoder, EncoderConfig};
    use crate::testing::loopback;
    use std::time::Duration;
    use tch::Device;

    fn encoder(seed: u64) -> nn::VarStore {
        let vs = nn::VarStore::new(Device::Cpu);
        with_torch_seed(seed, || Encoder::new(&vs.root(), EncoderConfig::tiny()));
        vs
    }

    #[test]
    fn checksums_see_every_bit() {
        let vs = encoder(0);
        let before = encoder_checksum(&vs);
        assert_eq!(before, encoder_checksum(&encoder(0)));
        assert_ne!(before, encoder_checksum(&encoder(1)));
        let (_, t) = encoder_variables(&vs).pop().unwrap();
        tch::no_grad(|| {
            let flat = t.view([-1]);
            let v = flat.double_value(&[0]) as f32;
            let _ = flat.narrow(0, 0, 1).fill_(f64::from(f32::from_bits(v.to_bits() ^ 1)));
        });
        assert_ne!(before, encoder_checksum(&vs));
        assert_eq!(f32s_to_u64(&u64_to_f32s(0xdead_beef_0123_4567)), 0xdead_beef_0123_4567);
    }

    #[test]
    fn the_encoder_of_the_root_reaches_every_rank() {
        let group = loopback::tcp_group(3, Duration::from_secs(20));
        let root_sum = encoder_checksum(&encoder(11));
        let results = loopback::run(&group, |rank, c| {
            // Every rank starts from different weights; rank 1 is the root.
            let vs = encoder(10 + rank as u64);
            let sum = broadcast_encoder(&vs, c, 1).unwrap();
            (sum, encoder_checksum(&vs))
        });
        for (sum, mine) in results {
            assert_eq!(sum, root_sum);
            assert_eq!(mine, root_sum);
        }
    }

    #[test]
    fn rows_of_uneven_shards_gather_in_rank_order() {
        let group = loopback::tcp_group(3, Duration::from_secs(20));
        let results = loopback::run(&group, |rank, c| {
            let n = [2i64, 0, 3][rank];
            let rows = Tensor::arange(n * 2, (Kind::Float, Device::Cpu)).view([n, 2]) + 100.0 * rank as f64;
            Vec::<f32>::try_from(gather_rows(c, &rows).unwrap().flatten(0, -1)).unwrap()
        });
        let want: Vec<f32> = vec![0., 1., 2., 3., 200., 201., 202., 203., 204., 205.];
        for got in results {
            assert_eq!(got, want);
        }
        let group = loopback::tcp_group(2, Duration::from_secs(20));
        let errors = loopback::run(&group, |rank, c| {
            gather_rows(c, &Tensor::zeros([1, 2 + rank as i64], (Kind::Float, Device::Cpu))).unwrap_err()
        });
        assert!(errors[0].contains("width"), "{}", errors[0]);
    }
}
