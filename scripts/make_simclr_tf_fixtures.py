#!/usr/bin/env python3
"""Writes the SimCLR TensorFlow encoder fixtures of tests/tests/simclr_tf_import.rs (committed, so CI
needs no TensorFlow):

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu==2.21.0
    /tmp/tf/bin/python scripts/make_simclr_tf_fixtures.py tests/tests/fixtures/simclr_tf

google-research/simclr's ResNets, written here from their published layout (tf2/resnet.py and the TF1
resnet.py: conv2d_fixed_padding, the bottleneck block with its projection shortcut, SimCLR v2's
selective-kernel convolution, ResNet-D shortcut and three-layer stem, a 3x3/2 max pool with SAME
padding), at the smallest size with every part: bottleneck blocks, one per stage, 2 base channels.
For selective kernels off and on, each in both namings:

- `tf1_sk{0,1}/model.ckpt`: tf.compat.v1.train.Saver, variables named as `tf.layers` numbers them in
  creation order under `base_model/` (plus a contrastive head, Momentum slots and global_step, which the
  importer must leave behind);
- `tf2_sk{0,1}/ckpt-1`: tf.train.Checkpoint of an object tree with the attribute paths of tf2/resnet.py
  (`model/resnet_model/block_groups/0/layers/0/projection_layers/0/conv2d/kernel`, ...), plus a
  supervised head and a step counter;
- `tf2_sk1_saved_model/variables/`: the same net as `tf2_sk1` saved with tf.saved_model.save, as SimCLR
  v2's published SavedModels are (only `variables/` is kept: the importer reads nothing else, and
  saved_model.pb is a quarter of a megabyte);
- `input.f32`: a batch of grayscale images (N x H x W, little-endian float32), which the net sees
  repeated to 3 channels;
- `expected.json`: each fixture's features for that input from a TensorFlow forward pass (tf.nn ops,
  NHWC, TensorFlow's own padding rules), and the variable names and shapes of the full-size r50_1x_sk0
  and r50_1x_sk1 in both namings, r152_3x_sk1 (TF1) and r101_2x_sk0 (TF2), with their trainable
  parameter counts.
"""
import json
import os
import shutil
import sys

import numpy as np
import tensorflow as tf

OUT = sys.argv[1]
EPS = 1e-5  # BATCH_NORM_EPSILON
SK_RATIO, SK_MIN_DIM = 0.0625, 32
N, SIZE = 2, 72  # 72: an even stem output (asymmetric SAME max pool) and an odd stage-3 map (ResNet-D pad)


class Spec:
    """The nets' layers in creation order: ("conv", name, HWIO shape) and ("bn", name, channels), with the
    TF2 object path of each."""

    def __init__(self, base, blocks, sk, in_channels=3):
        self.layers = []  # (kind, tf2 path, shape or channels)
        self.tf1 = []  # (kind, shape or channels) in creation order
        root = "model/resnet_model"
        stem = f"{root}/initial_conv_relu_max_pool"
        if sk:
            self.conv(f"{stem}/0/conv2d", 3, in_channels, base // 2)
            self.bn(f"{stem}/1/bn", base // 2)
            self.conv(f"{stem}/2/conv2d", 3, base // 2, base // 2)
            self.bn(f"{stem}/3/bn", base // 2)
            self.conv(f"{stem}/4/conv2d", 3, base // 2, base)
            self.bn(f"{stem}/6/bn", base)
        else:
            self.conv(f"{stem}/0/conv2d", 7, in_channels, base)
            self.bn(f"{stem}/2/bn", base)
        cin = base
        for g, n in enumerate(blocks):
            filters = base << g
            for b in range(n):
                p = f"{root}/block_groups/{g}/layers/{b}"
                if b == 0:
                    # ResNet-D with selective kernels: [pad,] avg pool, conv, bn; else conv, bn.
                    first = (2 if g > 0 else 1) if sk else 0
                    self.conv(f"{p}/projection_layers/{first}/conv2d", 1, cin, 4 * filters)
                    self.bn(f"{p}/projection_layers/{first + 1}/bn", 4 * filters)
                layers = f"{p}/conv_relu_dropblock_layers"
                self.conv(f"{layers}/0/conv2d", 1, cin, filters)
                self.bn(f"{layers}/1/bn", filters)
                if sk:
                    self.conv(f"{layers}/3/conv2d_fixed_padding/conv2d", 3, filters, 2 * filters)
                    self.bn(f"{layers}/3/batch_norm_relu/bn", 2 * filters)
                    mid = max(int(filters * SK_RATIO), SK_MIN_DIM)
                    self.conv(f"{layers}/3/conv2d_0", 1, filters, mid)
                    self.bn(f"{layers}/3/batch_norm_relu_1/bn", mid)
                    self.conv(f"{layers}/3/conv2d_1", 1, mid, 2 * filters)
                    self.conv(f"{layers}/5/conv2d", 1, filters, 4 * filters)
                    self.bn(f"{layers}/6/bn", 4 * filters)
                else:
                    self.conv(f"{layers}/3/conv2d", 3, filters, filters)
                    self.bn(f"{layers}/4/bn", filters)
                    self.conv(f"{layers}/6/conv2d", 1, filters, 4 * filters)
                    self.bn(f"{layers}/7/bn", 4 * filters)
                cin = 4 * filters
        self.features = cin

    def conv(self, path, k, cin, cout):
        self.layers.append(("conv", path, (k, k, cin, cout)))

    def bn(self, path, c):
        self.layers.append(("bn", path, c))

    def names(self, naming):
        """{name: shape} of every variable, in TF1 or TF2 naming."""
        out = {}
        nc = nb = 0
        for kind, path, shape in self.layers:
            if kind == "conv":
                name = f"base_model/conv2d{'_%d' % nc if nc else ''}/kernel" if naming == "tf1" else f"{path}/kernel"
                out[name] = list(shape)
                nc += 1
            else:
                scope = f"base_model/batch_normalization{'_%d' % nb if nb else ''}" if naming == "tf1" else path
                for v in ("gamma", "beta", "moving_mean", "moving_variance"):
                    out[f"{scope}/{v}"] = [shape]
                nb += 1
        if naming == "tf2":
            out = {f"{k}/.ATTRIBUTES/VARIABLE_VALUE": v for k, v in out.items()}
        return out

    def trainable(self):
        return sum(int(np.prod(s)) if k == "conv" else 2 * s for k, _, s in self.layers)


def draw(spec, rng):
    """Values by TF2 path: He-scaled kernels, BatchNorm statistics away from the identity."""
    values = {}
    for kind, path, shape in spec.layers:
        if kind == "conv":
            fan_in = shape[0] * shape[1] * shape[2]
            values[path] = {"kernel": (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)}
        else:
            values[path] = {
                "gamma": (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32),
                "beta": (0.1 * rng.standard_normal(shape)).astype(np.float32),
                "moving_mean": (0.1 * rng.standard_normal(shape)).astype(np.float32),
                "moving_variance": (0.5 + rng.random(shape)).astype(np.float32),
            }
    return values


def pad_conv(x, kernel, stride):
    """conv2d_fixed_padding: explicit symmetric padding and VALID when strided, SAME otherwise."""
    k = kernel.shape[0]
    if stride > 1:
        beg = (k - 1) // 2
        x = tf.pad(x, [[0, 0], [beg, k - 1 - beg], [beg, k - 1 - beg], [0, 0]])
        return tf.nn.conv2d(x, kernel, stride, "VALID")
    return tf.nn.conv2d(x, kernel, 1, "SAME")


def forward(spec, values, images, base, blocks, sk):
    root = "model/resnet_model"
    stem = f"{root}/initial_conv_relu_max_pool"

    def bn(x, path, relu=True):
        v = values[path]
        y = tf.nn.batch_normalization(x, v["moving_mean"], v["moving_variance"], v["beta"], v["gamma"], EPS)
        return tf.nn.relu(y) if relu else y

    def k(path):
        return values[path]["kernel"]

    x = tf.tile(images, [1, 1, 1, 3])
    if sk:
        x = bn(pad_conv(x, k(f"{stem}/0/conv2d"), 2), f"{stem}/1/bn")
        x = bn(pad_conv(x, k(f"{stem}/2/conv2d"), 1), f"{stem}/3/bn")
        x = bn(pad_conv(x, k(f"{stem}/4/conv2d"), 1), f"{stem}/6/bn")
    else:
        x = bn(pad_conv(x, k(f"{stem}/0/conv2d"), 2), f"{stem}/2/bn")
    x = tf.nn.max_pool2d(x, 3, 2, "SAME")
    for g, n in enumerate(blocks):
        for b in range(n):
            stride = 2 if g > 0 and b == 0 else 1
            p = f"{root}/block_groups/{g}/layers/{b}"
            shortcut = x
            if b == 0:
                if sk:
                    s = x
                    if stride > 1:
                        s = tf.pad(s, [[0, 0], [0, 1], [0, 1], [0, 0]])
                    s = tf.nn.avg_pool2d(s, 2, stride, "SAME" if stride == 1 else "VALID")
                    first = 2 if g > 0 else 1
                    shortcut = bn(pad_conv(s, k(f"{p}/projection_layers/{first}/conv2d"), 1),
                                  f"{p}/projection_layers/{first + 1}/bn", relu=False)
                else:
                    shortcut = bn(pad_conv(x, k(f"{p}/projection_layers/0/conv2d"), stride),
                                  f"{p}/projection_layers/1/bn", relu=False)
            layers = f"{p}/conv_relu_dropblock_layers"
            y = bn(pad_conv(x, k(f"{layers}/0/conv2d"), 1), f"{layers}/1/bn")
            if sk:
                sk_path = f"{layers}/3"
                y = bn(pad_conv(y, k(f"{sk_path}/conv2d_fixed_padding/conv2d"), stride),
                       f"{sk_path}/batch_norm_relu/bn")
                streams = tf.stack(tf.split(y, 2, axis=3))
                pooled = tf.reduce_mean(tf.reduce_sum(streams, axis=0), [1, 2], keepdims=True)
                hidden = bn(tf.nn.conv2d(pooled, k(f"{sk_path}/conv2d_0"), 1, "VALID"),
                            f"{sk_path}/batch_norm_relu_1/bn")
                mixing = tf.nn.conv2d(hidden, k(f"{sk_path}/conv2d_1"), 1, "VALID")
                mixing = tf.nn.softmax(tf.stack(tf.split(mixing, 2, axis=3)), axis=0)
                y = tf.reduce_sum(streams * mixing, axis=0)
                y = bn(pad_conv(y, k(f"{layers}/5/conv2d"), 1), f"{layers}/6/bn", relu=False)
            else:
                y = bn(pad_conv(y, k(f"{layers}/3/conv2d"), stride), f"{layers}/4/bn")
                y = bn(pad_conv(y, k(f"{layers}/6/conv2d"), 1), f"{layers}/7/bn", relu=False)
            x = tf.nn.relu(y + shortcut)
    return tf.reduce_mean(x, [1, 2]).numpy()


def write_tf1(spec, values, directory, rng):
    graph = tf.Graph()
    with graph.as_default():
        nc = nb = 0
        for kind, path, shape in spec.layers:
            if kind == "conv":
                name = f"base_model/conv2d{'_%d' % nc if nc else ''}/kernel"
                var = tf.compat.v1.get_variable(name, initializer=values[path]["kernel"])
                if nc < 2:  # optimiser slots, as the published checkpoints have for every variable
                    tf.compat.v1.get_variable(f"{name}/Momentum", initializer=np.zeros(shape, np.float32))
                nc += 1
            else:
                scope = f"base_model/batch_normalization{'_%d' % nb if nb else ''}"
                for v in ("gamma", "beta", "moving_mean", "moving_variance"):
                    tf.compat.v1.get_variable(f"{scope}/{v}", initializer=values[path][v])
                nb += 1
        tf.compat.v1.get_variable("head_contrastive/nl_0/dense/kernel",
                                  initializer=rng.standard_normal((spec.features, 8)).astype(np.float32))
        tf.compat.v1.get_variable("global_step", initializer=np.int64(250228))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, f"{directory}/model.ckpt", write_meta_graph=False)


def write_tf2(spec, values, directory, rng):
    def module_at(root, parts):
        node = root
        for part in parts:
            if part.isdigit():
                i = int(part)
                while len(node) <= i:
                    node.append(tf.Module())  # layers with no variables keep their list positions
                node = node[i]
            else:
                child = getattr(node, part, None)
                if child is None:
                    child = [] if part in LISTS else tf.Module()
                    setattr(node, part, child)
                    child = getattr(node, part)
                node = child
        return node

    root = tf.Module()
    for path, variables in values.items():
        parts = path.split("/")
        assert parts[0] == "model"
        node = module_at(root, parts)
        for name, value in variables.items():
            setattr(node, name, tf.Variable(value))
    root.model.supervised_head = tf.Module()
    root.model.supervised_head.kernel = tf.Variable(rng.standard_normal((spec.features, 10)).astype(np.float32))
    checkpoint = tf.train.Checkpoint(model=root.model, global_step=tf.Variable(np.int64(250228)))
    path = checkpoint.write(f"{directory}/ckpt-1")
    if directory.endswith("tf2_sk1"):
        export = tf.Module()
        export.model = root.model
        saved = f"{directory}_saved_model"
        tf.saved_model.save(export, f"{saved}/full")
        shutil.rmtree(f"{saved}/variables", ignore_errors=True)
        shutil.move(f"{saved}/full/variables", f"{saved}/variables")
        shutil.rmtree(f"{saved}/full")
    return path


LISTS = {"initial_conv_relu_max_pool", "block_groups", "layers", "projection_layers", "conv_relu_dropblock_layers"}

rng = np.random.default_rng(0)
images = rng.random((N, SIZE, SIZE, 1)).astype(np.float32)
os.makedirs(OUT, exist_ok=True)
images[..., 0].astype("<f4").tofile(f"{OUT}/input.f32")
expected = {"tensorflow": tf.__version__, "input": [N, SIZE, SIZE], "fixtures": {}, "full_size": {}}
base, blocks = 2, [1, 1, 1, 1]
for sk in (0, 1):
    spec = Spec(base, blocks, bool(sk))
    for naming in ("tf1", "tf2"):
        values = draw(spec, rng)
        directory = f"{OUT}/{naming}_sk{sk}"
        os.makedirs(directory, exist_ok=True)
        if naming == "tf1":
            write_tf1(spec, values, directory, rng)
            reader = tf.train.load_checkpoint(f"{directory}/model.ckpt")
        else:
            path = write_tf2(spec, values, directory, rng)
            reader = tf.train.load_checkpoint(path)
        # The checkpoint holds what the spec says, under the spec's names.
        stored = reader.get_variable_to_shape_map()
        for name, shape in spec.names(naming).items():
            assert list(stored[name]) == shape, (name, stored.get(name), shape)
        features = forward(spec, values, tf.constant(images), base, blocks, bool(sk))
        expected["fixtures"][f"{naming}_sk{sk}"] = {
            "features": features.ravel().tolist(),
            "shape": list(features.shape),
            "variables": len(stored),
        }
for sk in (0, 1):
    spec = Spec(64, [3, 4, 6, 3], bool(sk))
    for naming in ("tf1", "tf2"):
        expected["full_size"][f"r50_1x_sk{sk}_{naming}"] = {"variables": spec.names(naming), "trainable": spec.trainable()}
# Other depths and widths, one naming each (the lists are long): SimCLR v2's largest, and a 2x ResNet-101.
for key, base, blocks, sk, naming in [("r152_3x_sk1_tf1", 192, [3, 8, 36, 3], True, "tf1"),
                                      ("r101_2x_sk0_tf2", 128, [3, 4, 23, 3], False, "tf2")]:
    spec = Spec(base, blocks, sk)
    expected["full_size"][key] = {"variables": spec.names(naming), "trainable": spec.trainable()}
with open(f"{OUT}/expected.json", "w") as f:
    json.dump(expected, f)
print(json.dumps({k: v["trainable"] for k, v in expected["full_size"].items()}))
