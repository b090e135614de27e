"""PyTorch's side of worker/tests/torchvision_interop.rs::one_step_matches_pytorch.

    python one_step.py BEFORE_DIR AFTER_DIR IO.safetensors

BEFORE_DIR and AFTER_DIR are our checkpoints around one training step (ResNet-18, 2-layer head,
augmentations off, SGD with momentum 0.9, no weight decay). The same step is taken here with
torchvision's ResNet-18, torch.nn layers, an NT-Xent written from the paper's formula and
torch.optim.SGD, from BEFORE's weights; the loss and every weight after the step are compared with
ours. Prints one JSON line; exits 1 when they differ by more than the tolerance.
"""
import json
import sys

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file

before, after, io_path = sys.argv[1:4]
torch.set_num_threads(1)
io = load_file(io_path)
images, lr, tau, our_loss = io["images"], io["lr"].item(), io["tau"].item(), io["loss"].item()

encoder = torchvision.models.resnet18()
encoder.fc = torch.nn.Identity()
encoder.load_state_dict(load_file(f"{before}/encoder.safetensors"), strict=True)
head_state = load_file(f"{before}/head.safetensors")
hidden, features = head_state["projection_head.0.linear.weight"].shape
out = head_state["projection_head.1.linear.weight"].shape[0]
head = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out))
head.load_state_dict({
    "0.weight": head_state["projection_head.0.linear.weight"], "0.bias": head_state["projection_head.0.linear.bias"],
    "2.weight": head_state["projection_head.1.linear.weight"], "2.bias": head_state["projection_head.1.linear.bias"],
}, strict=True)
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
optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
optimizer.zero_grad()
loss.backward()
optimizer.step()

ours_after = load_file(f"{after}/encoder.safetensors")
theirs_after = encoder.state_dict()
worst, worst_key = 0.0, None
for key, value in theirs_after.items():
    if key.endswith("num_batches_tracked"):
        if int(value) != int(ours_after[key]):
            worst, worst_key = float("inf"), key
        continue
    scale = max(1.0, value.abs().max().item())
    err = (value - ours_after[key]).abs().max().item() / scale
    if err > worst:
        worst, worst_key = err, key
head_after = load_file(f"{after}/head.safetensors")
for ours_key, theirs in [("projection_head.0.linear.weight", head[0].weight), ("projection_head.1.linear.bias", head[2].bias)]:
    err = (theirs.detach() - head_after[ours_key]).abs().max().item() / max(1.0, theirs.abs().max().item())
    if err > worst:
        worst, worst_key = err, ours_key
loss_error = abs(loss.item() - our_loss) / max(1.0, abs(loss.item()))
print(json.dumps({"loss_pytorch": loss.item(), "loss_ours": our_loss, "loss_relative_error": loss_error,
                  "weights_max_relative_error": worst, "worst_key": worst_key}))
sys.exit(0 if loss_error <= 1e-5 and worst <= 1e-5 else 1)
