#!/usr/bin/env python3
"""Writes the TensorFlow checkpoint fixtures of coordinator/tests/tf_bundle.rs (a few KB, committed, so
CI needs no TensorFlow):

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu==2.21.0
    /tmp/tf/bin/python scripts/make_tf_checkpoint_fixtures.py coordinator/tests/fixtures/tf

- `object/ckpt`: tf.train.Checkpoint (TF2, object-based names `model/.../.ATTRIBUTES/VARIABLE_VALUE`),
  with SimCLR's layer names (a conv kernel in HWIO, BatchNorm's gamma/beta/moving statistics), float16,
  float64 and int64 variables, and enough entries for several restart points of the index's
  prefix-compressed keys;
- `saver/model.ckpt`: tf.compat.v1.train.Saver (TF1 names `base_model/conv2d/kernel`), as SimCLR v1's
  checkpoints;
- `expected.json`: every variable's shape and values, as TensorFlow reads them back.
"""
import json
import os
import sys

import numpy as np
import tensorflow as tf

out = sys.argv[1]
os.makedirs(f"{out}/object", exist_ok=True)
os.makedirs(f"{out}/saver", exist_ok=True)
rng = np.random.default_rng(0)
expected = {}


def record(prefix, reader_path):
    reader = tf.train.load_checkpoint(reader_path)
    for name, shape in sorted(reader.get_variable_to_shape_map().items()):
        if name == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        value = reader.get_tensor(name)
        expected[f"{prefix}:{name}"] = {
            "shape": list(shape),
            "dtype": str(value.dtype),
            "values": np.asarray(value, dtype=np.float64).ravel().tolist(),
        }


# TF2, object-based.
model = tf.Module()
model.conv = tf.Variable(rng.standard_normal((3, 3, 2, 4)).astype(np.float32))  # HWIO
model.gamma = tf.Variable(rng.standard_normal(4).astype(np.float32))
model.beta = tf.Variable(rng.standard_normal(4).astype(np.float32))
model.moving_mean = tf.Variable(rng.standard_normal(4).astype(np.float32))
model.moving_variance = tf.Variable(rng.random(4).astype(np.float32) + 0.5)
model.half = tf.Variable(rng.standard_normal((2, 3)).astype(np.float16))
model.double = tf.Variable(rng.standard_normal(5))
model.step = tf.Variable(np.int64(12345))
# Enough entries for several restart points (every 16 keys) in the index.
model.many = [tf.Variable(np.float32(i) * np.ones(2, np.float32)) for i in range(120)]
path = tf.train.Checkpoint(model=model).write(f"{out}/object/ckpt")
record("object", path)

# TF1, name-based.
graph = tf.Graph()
with graph.as_default():
    with tf.compat.v1.variable_scope("base_model"):
        tf.compat.v1.get_variable("conv2d/kernel", initializer=rng.standard_normal((7, 7, 3, 2)).astype(np.float32))
        tf.compat.v1.get_variable("batch_normalization/gamma", initializer=np.ones(2, np.float32))
        tf.compat.v1.get_variable("batch_normalization/moving_variance", initializer=np.full(2, 0.25, np.float32))
    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session(graph=graph) as session:
        session.run(tf.compat.v1.global_variables_initializer())
        path = saver.save(session, f"{out}/saver/model.ckpt", write_meta_graph=False)
record("saver", path)

with open(f"{out}/expected.json", "w") as f:
    json.dump({"tensorflow": tf.__version__, "variables": expected}, f)
print(json.dumps({"tensorflow": tf.__version__, "variables": len(expected)}))
