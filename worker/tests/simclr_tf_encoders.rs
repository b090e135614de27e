//! google-research/simclr's TensorFlow encoders, imported by `import-weights --from simclr-tf` and run
//! by our ResNet, give TensorFlow's features.
//!
//! The fixtures (tests/fixtures/simclr_tf, written by scripts/make_simclr_tf_fixtures.py with
//! TensorFlow 2.21) are SimCLR's bottleneck ResNet at its smallest (one block per stage, 2 base
//! channels), without and with SimCLR v2's selective kernels, each saved as a TF1 `Saver` checkpoint
//! (`base_model/conv2d_N` names, Momentum slots, a head, global_step) and as a TF2 object-based
//! checkpoint (`model/resnet_model/block_groups/...` paths), with the features TensorFlow computes for
//! a batch of 72x72 images. The full-size ResNet-50s' variable names and shapes (1x, SK off and on)
//! check the mapping and the parameter count at the published size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use simclr_coordinator::import::{self, simclr_tf, ImportOptions, SourceFormat};
use simclr_worker::engine::model::{
    encoder_file_metadata, load_encoder, parameter_count, Arch, Encoder, EncoderConfig, InputNormalisation, Stem,
    Variant,
};
use tch::{nn, Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/simclr_tf")
}

fn expected() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn images(expected: &serde_json::Value) -> Tensor {
    let dims: Vec<i64> = expected["input"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
    let bytes = std::fs::read(fixtures().join("input.f32")).unwrap();
    let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Tensor::from_slice(&values).view([dims[0], 1, dims[1], dims[2]])
}

/// A full-size net's variable names and shapes, as the fixture script lists them.
fn variable_shapes(full: &serde_json::Value) -> BTreeMap<String, Vec<usize>> {
    full["variables"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
        .collect()
}

fn import(input: &Path, out: &Path) -> import::ImportReport {
    let options = ImportOptions {
        from: SourceFormat::SimclrTf,
        input: input.to_path_buf(),
        output: out.to_path_buf(),
        prefix: None,
        strict: true,
        normalisation: None,
    };
    import::import_weights(&options).unwrap_or_else(|e| panic!("{}: {e}", input.display()))
}

#[test]
fn imported_encoders_give_tensorflows_features() {
    let expected = expected();
    let images = images(&expected);
    let dir = tempfile::tempdir().unwrap();
    // TF1 by its checkpoint directory (the `checkpoint` file names the prefix), TF2 by its .index file
    // or prefix, and a SavedModel directory (tf2_sk1's net saved by tf.saved_model.save).
    for (name, input, variant, features) in [
        ("tf1_sk0", fixtures().join("tf1_sk0"), Variant::SimclrTf, "tf1_sk0"),
        ("tf1_sk1", fixtures().join("tf1_sk1"), Variant::SimclrTfSk, "tf1_sk1"),
        ("tf2_sk0", fixtures().join("tf2_sk0/ckpt-1.index"), Variant::SimclrTf, "tf2_sk0"),
        ("tf2_sk1", fixtures().join("tf2_sk1/ckpt-1"), Variant::SimclrTfSk, "tf2_sk1"),
        ("saved_model", fixtures().join("tf2_sk1_saved_model"), Variant::SimclrTfSk, "tf2_sk1"),
    ] {
        let out = dir.path().join(format!("{name}.safetensors"));
        let report = import(&input, &out);
        assert_eq!((report.shape.arch, report.shape.variant), ("tiny_bottleneck", variant), "{name}");
        let meta = encoder_file_metadata(&out).unwrap();
        assert_eq!(meta["variant"], variant.name(), "{name}");
        assert_eq!(meta["input_normalisation"], "none", "{name}: SimCLR's TensorFlow models take [0, 1] pixels");
        assert_eq!(meta["selective_kernels"], (variant == Variant::SimclrTfSk).to_string());

        let config = EncoderConfig {
            arch: Arch::TinyBottleneck,
            width: 1,
            stem: Stem::Repeat3,
            normalisation: InputNormalisation::None,
            variant,
        };
        let mut vs = nn::VarStore::new(Device::Cpu);
        let encoder = Encoder::new(&vs.root(), config);
        load_encoder(&mut vs, &encoder, &out).unwrap();
        let ours = tch::no_grad(|| encoder.forward(&images, false));
        let fixture = &expected["fixtures"][features];
        let shape: Vec<i64> = fixture["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
        let values: Vec<f32> =
            fixture["features"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let theirs = Tensor::from_slice(&values).view(shape.as_slice());
        assert_eq!(ours.size(), theirs.size(), "{name}");
        let scale = theirs.abs().max().double_value(&[]);
        let error = (&ours - &theirs).abs().max().double_value(&[]) / scale;
        println!("{name}: max relative error {error:.2e} over {} features", theirs.numel());
        assert!(error <= 1e-4, "{name}: max relative error {error}");

        // The layout matters: the same weights with torchvision's max pool padding (or, with selective
        // kernels, without ResNet-D's pooling) would give other features; here, the variant refuses them.
        let mut other = nn::VarStore::new(Device::Cpu);
        let torchvision = Encoder::new(&other.root(), EncoderConfig { variant: Variant::Torchvision, ..config });
        let e = load_encoder(&mut other, &torchvision, &out).unwrap_err();
        assert!(e.contains(&format!("set pretrain.variant = \"{}\"", variant.name())), "{e}");
    }
}

#[test]
fn tensorflows_same_max_pool_is_not_torchvisions() {
    // Same weights, two layouts: on an even stem output the windows differ, so the features do.
    let config = EncoderConfig::new(Arch::TinyBottleneck, 1, Stem::Repeat3);
    let build = |variant| {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let encoder = Encoder::new(&vs.root(), EncoderConfig { variant, ..config });
        (vs, encoder)
    };
    let (_v1, torch_layout) = build(Variant::Torchvision);
    let (_v2, tf_layout) = build(Variant::SimclrTf);
    let images = Tensor::rand([2, 1, 64, 64], (Kind::Float, Device::Cpu));
    let a = tch::no_grad(|| torch_layout.forward(&images, false));
    let b = tch::no_grad(|| tf_layout.forward(&images, false));
    assert!(!a.allclose(&b, 1e-4, 1e-4, false));
}

#[test]
fn full_size_resnet50s_map_completely_and_count_simclr_v2s_parameters() {
    let expected = expected();
    for (key, variant) in [
        ("r50_1x_sk0_tf1", Variant::SimclrTf),
        ("r50_1x_sk0_tf2", Variant::SimclrTf),
        ("r50_1x_sk1_tf1", Variant::SimclrTfSk),
        ("r50_1x_sk1_tf2", Variant::SimclrTfSk),
    ] {
        let full = &expected["full_size"][key];
        let shapes = variable_shapes(full);
        let plan = simclr_tf::plan(&shapes, None).unwrap();
        assert_eq!((plan.shape.arch, plan.shape.width, plan.shape.variant), ("resnet50", 1, variant), "{key}");
        // Every TensorFlow variable maps, onto every tensor of ours (counters aside), with its shape.
        let ours = import::expected_tensors(&plan.shape);
        let mapped: BTreeMap<&str, &str> = plan.renames.iter().map(|(t, o)| (o.as_str(), t.as_str())).collect();
        assert_eq!(plan.renames.len(), shapes.len(), "{key}");
        for (name, dims) in ours.iter().filter(|(n, _)| !n.ends_with("num_batches_tracked")) {
            let tf = mapped.get(name.as_str()).unwrap_or_else(|| panic!("{key}: nothing maps to {name}"));
            let mut tf_dims = shapes[*tf].clone();
            if tf_dims.len() == 4 {
                tf_dims = vec![tf_dims[3], tf_dims[2], tf_dims[0], tf_dims[1]];
            }
            assert_eq!(&tf_dims, dims, "{key}: {tf} -> {name}");
        }
        // Our ResNet-50 of that layout has TensorFlow's trainable parameters.
        let vs = nn::VarStore::new(Device::Cpu);
        let _encoder =
            Encoder::new(&vs.root(), EncoderConfig { variant, ..EncoderConfig::new(Arch::Resnet50, 1, Stem::Repeat3) });
        let count = parameter_count(&vs, "");
        assert_eq!(count, full["trainable"].as_i64().unwrap(), "{key}");
        if variant == Variant::SimclrTfSk {
            // SimCLR v2's README: r50_1x_sk1 has 35M parameters (35,215,584; with the 1000-class
            // head, 37.3M, as the PyTorch ports count it).
            assert_eq!(count, 35_215_584);
        } else {
            assert_eq!(count, 23_508_032, "torchvision's resnet50 without fc");
        }
    }
    // Other depths and widths: the mapping is complete and the import's tensor list counts TensorFlow's
    // parameters, which round to SimCLR v2's README table (r152_3x_sk1 795M, r101_2x_sk0 170M).
    for (key, arch, width, variant, published_m) in [
        ("r152_3x_sk1_tf1", "resnet152", 3, Variant::SimclrTfSk, 795),
        ("r101_2x_sk0_tf2", "resnet101", 2, Variant::SimclrTf, 170),
    ] {
        let full = &expected["full_size"][key];
        let shapes = variable_shapes(full);
        let plan = simclr_tf::plan(&shapes, None).unwrap();
        assert_eq!((plan.shape.arch, plan.shape.width, plan.shape.variant), (arch, width, variant), "{key}");
        assert_eq!(plan.renames.len(), shapes.len(), "{key}");
        let ours = import::expected_tensors(&plan.shape);
        let count: usize = ours
            .iter()
            .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var") && !n.ends_with("tracked"))
            .map(|(_, d)| d.iter().product::<usize>())
            .sum();
        assert_eq!(count as i64, full["trainable"].as_i64().unwrap(), "{key}");
        assert_eq!((count as f64 / 1e6).round() as i64, published_m, "{key}");
        for (tf, name) in &plan.renames {
            let mut dims = shapes[tf].clone();
            if dims.len() == 4 {
                dims = vec![dims[3], dims[2], dims[0], dims[1]];
            }
            assert_eq!(Some(&dims), ours.get(name), "{key}: {tf} -> {name}");
        }
    }
}

#[test]
fn checkpoints_that_are_no_simclr_bottleneck_net_are_refused_by_name() {
    let expected = expected();
    let shapes = |key: &str| variable_shapes(&expected["full_size"][key]);
    // A TF1 checkpoint missing one convolution.
    let mut gap = shapes("r50_1x_sk0_tf1");
    gap.remove("base_model/conv2d_40/kernel");
    let e = simclr_tf::plan(&gap, None).unwrap_err().to_string();
    assert!(e.contains("base_model/") && e.contains("numbered"), "{e}");
    // A TF2 checkpoint missing a selective-kernel part.
    let mut sk = shapes("r50_1x_sk1_tf2");
    sk.retain(|k, _| !k.contains("block_groups/2/layers/3/conv_relu_dropblock_layers/3/conv2d_1/"));
    let e = simclr_tf::plan(&sk, None).unwrap_err().to_string();
    assert!(e.contains("block_groups/2/layers/3") && e.contains("sk.expand"), "{e}");
    // TensorFlow's BasicBlock nets.
    let mut basic = shapes("r50_1x_sk0_tf2");
    basic.insert(
        "model/resnet_model/block_groups/0/layers/0/conv2d_bn_layers/0/conv2d/kernel/.ATTRIBUTES/VARIABLE_VALUE".into(),
        vec![3, 3, 64, 64],
    );
    let e = simclr_tf::plan(&basic, None).unwrap_err().to_string();
    assert!(e.contains("BasicBlock"), "{e}");
    // A wrong --prefix names what was found.
    let e = simclr_tf::plan(&shapes("r50_1x_sk0_tf1"), Some("ema_model/")).unwrap_err().to_string();
    assert!(e.contains("'base_model/'"), "{e}");
    // A PyTorch file given as simclr-tf, and a TensorFlow checkpoint given as torchvision.
    let dir = tempfile::tempdir().unwrap();
    let not_tf = dir.path().join("x.pth");
    std::fs::write(&not_tf, b"PK\x03\x04").unwrap();
    let options = |from, input: PathBuf| ImportOptions {
        from,
        input,
        output: dir.path().join("out.safetensors"),
        prefix: None,
        strict: false,
        normalisation: None,
    };
    let e = import::import_weights(&options(SourceFormat::SimclrTf, not_tf)).unwrap_err().to_string();
    assert!(e.contains("x.pth") && e.contains("not a TensorFlow checkpoint"), "{e}");
    let tf = fixtures().join("tf2_sk0/ckpt-1.index");
    let e = import::import_weights(&options(SourceFormat::Torchvision, tf)).unwrap_err().to_string();
    assert!(e.contains("--from simclr-tf"), "{e}");
}
