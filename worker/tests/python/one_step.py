"""PyTorch's side of worker/tests/torchvision_interop.rs::one_step_matches_pytorch.

    python one_step.py BEFORE_DIR AFTER_DIR IO.safetensors SETTINGS_JSON

BEFORE_DIR and AFTER_DIR are our checkpoints around one training step (ResNet-18, augmentations off).
SETTINGS_JSON says which optimiser ("sgd": torch.optim.SGD with momentum; "lars": LARS as SimCLR defines
it, written here from its formula) with its momentum, weight decay and trust coefficient, and which
projection head (its number of layers, and BatchNorm after each hidden layer as in SimCLR v2). The
same step is taken here with torchvision's ResNet-18, torch.nn layers and an NT-Xent written from the
paper's formula, from BEFORE's weights. Compared with ours: the loss, and the update of every variable
(after - before, BatchNorm running statistics included), relative to the largest element of that
variable's update. Prints one JSON line; exits 1 when they differ by more than the tolerance.
"""
import json
import sys

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file

LOSS_TOLERANCE = 1e-5
UPDATE_TOLERANCE = 1e-3

before, after, io_path, settings = sys.argv[1:5]
settings = json.loads(settings)
torch.set_num_threads(1)
io = load_file(io_path)
images, lr, tau, our_loss = io["images"], io["lr"].item(), io["tau"].item(), io["loss"].item()

encoder = torchvision.models.resnet18()
encoder.fc = torch.nn.Identity()
encoder.load_state_dict(load_file(f"{before}/encoder.safetensors"), strict=True)

# The projection head with our variable names: projection_head.{i}.linear (no bias before a BatchNorm)
# and projection_head.{i}.bn, a ReLU after every layer but the last.
head_before = load_file(f"{before}/head.safetensors")
layers, batch_norm = settings["head_layers"], settings["head_batch_norm"]
modules, names = [], {}
for i in range(layers):
    last = i + 1 == layers
    weight = head_before[f"projection_head.{i}.linear.weight"]
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=not batch_norm or last)
    names[f"projection_head.{i}.linear"] = linear
    modules.append(linear)
    if batch_norm and not last:
        bn = torch.nn.BatchNorm1d(weight.shape[0])
        names[f"projection_head.{i}.bn"] = bn
        modules.append(bn)
    if not last:
        modules.append(torch.nn.ReLU())
head = torch.nn.Sequential(*modules)
for prefix, module in names.items():
    state = {k[len(prefix) + 1:]: v for k, v in head_before.items() if k.startswith(prefix + ".")}
    module.load_state_dict(state, strict=True)


def head_state():
    return {f"{prefix}.{k}": v for prefix, module in names.items() for k, v in module.state_dict().items()}


encoder.train()
head.train()

# Both views are the images themselves (augmentations off): rows 0..n first views, n..2n second ones.
views = torch.cat([images, images]).repeat(1, 3, 1, 1)
z = F.normalize(head(encoder(views)), dim=1)
n2 = z.shape[0]
n = n2 // 2
logits = (z @ z.t() / tau).masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
positives = torch.cat([torch.arange(n, n2), torch.arange(0, n)])
loss = F.cross_entropy(logits, positives)  # mean over all 2n anchors: the paper's symmetric average
params = list(encoder.parameters()) + list(head.parameters())
for p in params:
    p.grad = None
loss.backward()

momentum, weight_decay = settings["momentum"], settings["weight_decay"]
if settings["optimizer"] == "sgd":
    torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay).step()
elif settings["optimizer"] == "lars":
    # SimCLR's LARS (You et al. 2017): for a weight matrix or kernel w with gradient g, d = g + wd * w,
    # trust = eta * ||w|| / ||d|| (1 when a norm is 0), v = m * v + lr * trust * d (v = 0 before the
    # first step), w = w - v. Biases and BatchNorm parameters (the 1-D ones) get neither decay nor trust.
    eta = settings["trust_coefficient"]
    with torch.no_grad():
        for p in params:
            d = p.grad.clone()
            scaled = lr
            if p.dim() > 1:
                d += weight_decay * p
                w_norm, d_norm = p.norm().item(), d.norm().item()
                scaled = lr * (eta * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0)
            p -= scaled * d  # momentum * v with v = 0 at the first step
else:
    sys.exit(f"unknown optimizer {settings['optimizer']}")

theirs_before = {**load_file(f"{before}/encoder.safetensors"), **head_before}
ours_after = {**load_file(f"{after}/encoder.safetensors"), **load_file(f"{after}/head.safetensors")}
# The head's BatchNorm counts no batches in our checkpoints (its momentum is fixed, so the count is never
# read); the encoder's count, which torchvision's state_dict carries, is compared.
theirs_after = {k: v for k, v in {**encoder.state_dict(), **head_state()}.items()
                if not (k.startswith("projection_head.") and k.endswith("num_batches_tracked"))}
worst, worst_key, compared = 0.0, None, 0
for key, value in theirs_after.items():
    if key.endswith("num_batches_tracked"):
        if int(value) != int(ours_after[key]):
            worst, worst_key = float("inf"), key
        continue
    w0 = theirs_before[key].double()
    theirs = value.double() - w0
    ours = ours_after[key].double() - w0
    scale = theirs.abs().max().item()
    if scale == 0.0:
        # A variable the step must leave alone stays exactly as it was.
        err = 0.0 if ours.abs().max().item() == 0.0 else float("inf")
    else:
        err = (theirs - ours).abs().max().item() / scale
    compared += 1
    if err > worst:
        worst, worst_key = err, key
missing = sorted(set(theirs_after) ^ set(ours_after))
loss_error = abs(loss.item() - our_loss) / max(1.0, abs(loss.item()))
print(json.dumps({"settings": settings, "loss_pytorch": loss.item(), "loss_ours": our_loss,
                  "loss_relative_error": loss_error, "variables_compared": compared,
                  "update_max_relative_error": worst, "worst_key": worst_key, "unmatched_variables": missing}))
ok = loss_error <= LOSS_TOLERANCE and worst <= UPDATE_TOLERANCE and not missing
sys.exit(0 if ok else 1)
