//! The gate of distributed pretraining: from the same initial weights and seed, with augmentation on,
//! one optimiser step over the same global batch gives the same loss and the same updated weights (and
//! BatchNorm running statistics) with 1, 2 and 4 workers, each rank holding different images, in any
//! rank order, over both CPU backends (loopback TCP-ring and gRPC peers in this process: real sockets,
//! real ring collectives). A collective that drops the gather's backward must fail the same comparison.

use std::collections::BTreeMap;
use std::time::Duration;

use simclr_worker::comm::{Collective, CollectiveError};
use simclr_worker::engine::loss::{nt_xent, AnchorRows};
use simclr_worker::engine::model::{with_torch_seed, Arch, Variant};
use simclr_worker::engine::train::{BnMode, LrScalingName, OptimizerName, PretrainConfig, Trainer};
use simclr_worker::testing::loopback;
use tch::{Device, Kind, Tensor};

const GLOBAL_BATCH: usize = 8;

fn config() -> PretrainConfig {
    PretrainConfig {
        arch: Arch::Tiny,
        head_out: 8,
        head_batch_norm: true,
        head_layers: 3,
        batch_size: GLOBAL_BATCH,
        epochs: 1,
        optimizer: OptimizerName::Lars,
        base_lr: 2.0,
        lr_scaling: LrScalingName::None,
        warmup_epochs: 0.0,
        weight_decay: 1e-4,
        input_size: 32,
        bn: BnMode::Sync,
        seed: 3,
        ..PretrainConfig::default()
    }
}

fn images() -> Tensor {
    with_torch_seed(21, || Tensor::rand([GLOBAL_BATCH as i64, 1, 40, 40], (Kind::Float, Device::Cpu)))
}

type Weights = BTreeMap<String, Vec<f64>>;

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn weights(trainer: &Trainer) -> Weights {
    trainer.vs.variables().into_iter().map(|(name, t)| (name, values(&t))).collect()
}

type Backend = fn(usize, Duration) -> loopback::Group;

/// The bug the invariance test must catch: a reduce-scatter that keeps this rank's own block of the
/// key gradients instead of summing every rank's (the gradient flowing back through the all-gather is
/// dropped). Every other collective passes through.
struct DropGatherBackward(std::sync::Arc<dyn Collective>);

impl Collective for DropGatherBackward {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        self.0.all_reduce_sum(t)
    }
    fn all_reduce_sum_in_place(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.0.all_reduce_sum_in_place(t)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        self.0.all_gather(t)
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let block = t.size()[0] / self.world_size() as i64;
        Ok(t.narrow(0, self.rank() as i64 * block, block).copy())
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CollectiveError> {
        self.0.broadcast(t, root)
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.0.barrier()
    }
}

/// One step with the global batch split over `order.len()` ranks, rank r holding block `order[r]`.
fn distributed_step(order: &[usize], sabotage: bool, bn: BnMode, backend: Backend) -> Vec<(f64, Weights)> {
    distributed_step_of(PretrainConfig { bn, ..config() }, order, sabotage, backend)
}

fn distributed_step_of(
    config: PretrainConfig,
    order: &[usize],
    sabotage: bool,
    backend: Backend,
) -> Vec<(f64, Weights)> {
    let world = order.len();
    let group = backend(world, Duration::from_secs(60));
    let per = GLOBAL_BATCH / world;
    loopback::run(&group, |rank, collective| {
        assert_eq!(collective.rank(), rank);
        let member = std::sync::Arc::clone(&group.members[rank]);
        let collective: std::sync::Arc<dyn Collective> =
            if sabotage { std::sync::Arc::new(DropGatherBackward(member)) } else { member };
        let mut trainer = Trainer::distributed(config.clone(), per, Device::Cpu, collective).unwrap();
        let start = order[rank] * per;
        let ids: Vec<u64> = (start..start + per).map(|i| i as u64).collect();
        let local = images().narrow(0, start as i64, per as i64);
        let stats = trainer.train_step(&local, &ids).unwrap();
        (stats.loss, weights(&trainer))
    })
}

fn single_step() -> (f64, Weights, Weights) {
    single_step_of(config())
}

fn single_step_of(config: PretrainConfig) -> (f64, Weights, Weights) {
    let mut trainer = Trainer::new(config, GLOBAL_BATCH, Device::Cpu).unwrap();
    let before = weights(&trainer);
    let ids: Vec<u64> = (0..GLOBAL_BATCH as u64).collect();
    let stats = trainer.train_step(&images(), &ids).unwrap();
    (stats.loss, before, weights(&trainer))
}

/// The worst relative difference between two runs' updates (after - before) over every variable,
/// relative to the largest update of that variable; and the worst relative difference of the weights.
fn differences(before: &Weights, want: &Weights, got: &Weights) -> (f64, f64, String) {
    let (mut worst_update, mut worst_weight, mut which) = (0.0f64, 0.0f64, String::new());
    for (name, w) in want {
        let g = &got[name];
        let b = &before[name];
        let scale = w.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        let wscale = w.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-6);
        for i in 0..w.len() {
            let du = ((g[i] - b[i]) - (w[i] - b[i])).abs();
            if scale > 1e-9 && du / scale > worst_update {
                worst_update = du / scale;
                which = name.clone();
            }
            worst_weight = worst_weight.max((g[i] - w[i]).abs() / wscale);
        }
    }
    (worst_update, worst_weight, which)
}

#[test]
fn one_step_is_the_same_for_1_2_and_4_workers() {
    let (loss, before, want) = single_step();
    assert!(loss.is_finite());
    let backends: [(&str, Backend); 2] = [("tcp", loopback::tcp_group), ("grpc", loopback::group)];
    for ((name, backend), order) in
        backends.into_iter().flat_map(|b| [vec![0, 1], vec![1, 0], vec![0, 1, 2, 3], vec![2, 0, 3, 1]].map(|o| (b, o)))
    {
        eprintln!("backend {name}");
        let ranks = distributed_step(&order, false, BnMode::Sync, backend);
        for (rank, (got_loss, got)) in ranks.iter().enumerate() {
            assert!(
                (got_loss - loss).abs() <= 1e-5 * loss.abs(),
                "ranks {order:?}, rank {rank}: loss {got_loss} vs single-process {loss}"
            );
            let (update, weight, which) = differences(&before, &want, got);
            eprintln!("ranks {order:?} rank {rank}: loss {got_loss} vs {loss}; update {update:e} ({which}); weight {weight:e}");
            assert!(weight <= 1e-4, "ranks {order:?}, rank {rank}: weights differ by {weight:e} (relative)");
            assert!(
                update <= 1e-3,
                "ranks {order:?}, rank {rank}: update of {which} differs by {update:e} of its size"
            );
        }
        // Every replica holds bitwise the same weights.
        for (rank, (_, got)) in ranks.iter().enumerate().skip(1) {
            assert!(got == &ranks[0].1, "ranks {order:?}: rank {rank}'s weights differ from rank 0's");
        }
    }
}

#[test]
fn one_step_of_simclr_v2s_selective_kernel_resnet_is_the_same_for_1_and_2_workers() {
    // Its mixing layer's BatchNorm normalises N x C x 1 x 1 tensors: synchronised like every other.
    let sk = PretrainConfig { arch: Arch::TinyBottleneck, variant: Variant::SimclrTfSk, ..config() };
    let (loss, before, want) = single_step_of(sk.clone());
    for order in [vec![0, 1], vec![1, 0]] {
        for (rank, (got_loss, got)) in
            distributed_step_of(sk.clone(), &order, false, loopback::tcp_group).iter().enumerate()
        {
            assert!((got_loss - loss).abs() <= 1e-5 * loss.abs(), "rank {rank}: loss {got_loss} vs {loss}");
            let (_, weight, _) = differences(&before, &want, got);
            assert!(weight <= 1e-4, "rank {rank}: weights differ by {weight:e} (relative)");
            // Updates compared where they are not negligible: the tiny net's one-channel deep stem
            // has BatchNorm scales whose gradient is a sum that cancels to ~1e-5 of the weight (the
            // next convolution and BatchNorm normalise their scale away), where summation order alone
            // decides the digits.
            for (name, w) in &want {
                let (g, b) = (&got[name], &before[name]);
                let scale = w.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
                let size = w.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-6);
                if scale < 1e-3 * size {
                    continue;
                }
                let d = (0..w.len()).map(|i| ((g[i] - b[i]) - (w[i] - b[i])).abs()).fold(0.0, f64::max);
                assert!(d <= 1e-3 * scale, "ranks {order:?}, rank {rank}: update of {name} differs by {:e}", d / scale);
            }
        }
    }
}

#[test]
fn dropping_the_gathers_backward_is_caught() {
    let (_, before, want) = single_step();
    let ranks = distributed_step(&[0, 1], true, BnMode::Sync, loopback::tcp_group);
    let (update, _, which) = differences(&before, &want, &ranks[0].1);
    eprintln!("sabotaged: update difference {update:e} ({which})");
    assert!(update > 1e-2, "the sabotaged step should differ, but its worst update difference is {update:e} ({which})");
}

#[test]
fn per_worker_batchnorm_is_not_world_size_invariant() {
    // `bn = "local"` (each worker's own statistics) is a different model than one process holding the
    // global batch: the comparison that passes with synchronised BN must see it.
    let (_, before, want) = single_step();
    let ranks = distributed_step(&[0, 1], false, BnMode::Local, loopback::tcp_group);
    let (update, _, which) = differences(&before, &want, &ranks[0].1);
    assert!(update > 1e-2, "local BN should differ, but its worst update difference is {update:e} ({which})");
}

#[test]
fn random_embeddings_give_ln_2n_minus_1_on_every_rank() {
    let world = 4;
    let per_rank = 64i64; // images per rank: 128 views; global 2N = 512
    let group = loopback::group(world, Duration::from_secs(60));
    let losses = loopback::run(&group, |rank, c| {
        let z = with_torch_seed(100 + rank as u64, || Tensor::randn([2 * per_rank, 128], (Kind::Float, Device::Cpu)));
        let keys = c.all_gather(&z).unwrap();
        let rows = AnchorRows::rank_block(per_rank, rank as i64);
        let local = nt_xent(&z, &keys, &rows, 1.0, 2 * per_rank * world as i64);
        c.all_reduce_sum(&local.view([1])).unwrap().double_value(&[0])
    });
    let want = ((2 * per_rank * world as i64 - 1) as f64).ln();
    for (rank, loss) in losses.iter().enumerate() {
        assert!((loss - want).abs() < 0.05 * want, "rank {rank}: {loss} vs ln(2N - 1) = {want}");
        assert_eq!(*loss, losses[0]);
    }
}
