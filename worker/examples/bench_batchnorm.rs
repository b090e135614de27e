//! The compute cost of synchronised BatchNorm in one process: the encoder's training forward and
//! backward with libtorch's BatchNorm (`LocalNorm`) against `SyncNorm` over a world of one (the same
//! statistics through the C++ autograd function and its collective calls, which are the identity
//! here). Communication is excluded, so the difference is what the synchronised layer costs in
//! arithmetic. Over a world of one both compute the same gradients: the last column is the largest
//! difference of any parameter's gradient, relative to that gradient's largest magnitude. With
//! BENCH_BN_WORST=1 it names that parameter and sets both against float64 (libtorch's BatchNorm on a
//! float64 copy of the model): where the two differ most, both are that far from float64, a gradient
//! ill-conditioned in float32 at initialisation, not a difference of method.
//!
//! Usage: bench_batchnorm [REPEATS] [THREADS] [DEVICE]. Prints a markdown table (median seconds per
//! pass). `scripts/bench_distributed_step.sh` runs it before the 2-process step, `scripts/gpu_check.sh`
//! on cuda:0.

use std::time::Instant;

use simclr_worker::comm::Solo;
use simclr_worker::engine::model::{with_torch_seed, Arch, Encoder, EncoderConfig, LocalNorm, NormPass, Stem};
use simclr_worker::engine::syncbn::SyncNorm;
use tch::{nn, Device, Kind, Tensor};

fn main() {
    let repeats: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads: i32 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let device = match std::env::args().nth(3).as_deref() {
        None | Some("cpu") => Device::Cpu,
        Some(d) => Device::Cuda(d.trim_start_matches("cuda").trim_start_matches(':').parse().unwrap_or(0)),
    };
    tch::set_num_threads(threads);
    let sync_device = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    println!("| model | input | images | device | libtorch BatchNorm: s | SyncNorm (world of one): s | ratio | largest gradient difference |");
    println!("|---|---|---|---|---|---|---|---|");
    for (arch, name, size, n) in [(Arch::Resnet18, "ResNet-18", 64i64, 64i64), (Arch::Resnet50, "ResNet-50", 64, 32)] {
        let (vs, encoder) = with_torch_seed(1, || {
            let vs = nn::VarStore::new(device);
            let encoder = Encoder::new(&vs.root(), EncoderConfig::new(arch, 1, Stem::Repeat3));
            (vs, encoder)
        });
        let images = with_torch_seed(2, || Tensor::rand([n, 1, size, size], (Kind::Float, Device::Cpu))).to(device);
        let weights =
            with_torch_seed(3, || Tensor::randn([n, encoder.feature_dim], (Kind::Float, Device::Cpu))).to(device);
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let once = |f: &dyn Fn()| {
            for (_, t) in &params {
                t.shallow_clone().zero_grad();
            }
            sync_device();
            let start = Instant::now();
            f();
            sync_device();
            start.elapsed().as_secs_f64()
        };
        let grads = || params.iter().map(|(_, t)| t.grad().copy()).collect::<Vec<_>>();
        let local_pass = || {
            let h = encoder.forward_with(&images, &mut LocalNorm { train: true });
            (&h * &weights).sum(Kind::Float).backward();
        };
        let sync_pass = || {
            let mut pass = SyncNorm::new(&Solo);
            let h = encoder.forward_with(&images, &mut pass as &mut dyn NormPass);
            pass.backward(&h, &weights).unwrap();
        };
        // One pass of each first (also the gradient comparison), then alternated, so that drift in
        // the machine's speed hits both.
        once(&local_pass);
        let local_grads = grads();
        once(&sync_pass);
        let (difference, worst) = local_grads
            .iter()
            .zip(grads())
            .zip(&params)
            .map(|((a, b), (name, _))| {
                let scale = a.abs().max().double_value(&[]).max(1e-12);
                ((a - b).abs().max().double_value(&[]) / scale, name.clone())
            })
            .fold((0.0, String::new()), |m, x| if x.0 > m.0 { x } else { m });
        if std::env::var_os("BENCH_BN_WORST").is_some() {
            eprintln!("{name}: largest difference in {worst}");
            // Both against float64 (libtorch's BatchNorm on a float64 copy of the model).
            let sync_grads = grads();
            let mut vs64 = nn::VarStore::new(device);
            let enc64 = Encoder::new(&vs64.root(), EncoderConfig::new(arch, 1, Stem::Repeat3));
            vs64.copy(&vs).unwrap();
            vs64.double();
            let h = enc64.forward_with(&images.to_kind(Kind::Double), &mut LocalNorm { train: true });
            (&h * weights.to_kind(Kind::Double)).sum(Kind::Double).backward();
            let mut p64: Vec<(String, Tensor)> =
                vs64.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
            p64.sort_by(|a, b| a.0.cmp(&b.0));
            let reference = p64.iter().find(|(n, _)| *n == worst).unwrap().1.grad();
            let i = params.iter().position(|(n, _)| *n == worst).unwrap();
            let scale = reference.abs().max().double_value(&[]);
            let err = |g: &Tensor| (g.to_kind(Kind::Double) - &reference).abs().max().double_value(&[]) / scale;
            eprintln!("  against float64: libtorch {:.1e}, SyncNorm {:.1e}", err(&local_grads[i]), err(&sync_grads[i]));
        }
        let (mut local, mut sync): (Vec<f64>, Vec<f64>) =
            (0..repeats).map(|_| (once(&local_pass), once(&sync_pass))).unzip();
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let (local, sync) = (median(&mut local), median(&mut sync));
        println!(
            "| {name} | {size}x{size} | {n} | {device:?} | {local:.4} | {sync:.4} | {:.2}x | {difference:.1e} |",
            sync / local
        );
    }
}
