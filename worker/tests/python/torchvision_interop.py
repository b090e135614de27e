"""PyTorch's side of worker/tests/torchvision_interop.rs.

    python torchvision_interop.py ARCH OURS.safetensors IO.safetensors OUT_DIR

1. Loads our saved encoder into torchvision.models.ARCH() (classifier replaced by Identity) with
   strict=True and compares its eval-mode features for IO's images with the features we computed.
2. Saves a freshly initialised torchvision model (classifier included, as a user's converted weights
   would be) and its features for the same images into OUT_DIR, for the Rust side to load and compare.
Prints one JSON line; exits 1 when the features differ by more than 1e-4 (relative to their scale).
"""
import json
import sys

import torch
import torchvision
from safetensors.torch import load_file, save_file

arch, ours_path, io_path, out_dir = sys.argv[1:5]
torch.set_num_threads(1)
io = load_file(io_path)
images = io["images"].repeat(1, 3, 1, 1)  # grayscale repeated to 3 channels, as our stem does

model = getattr(torchvision.models, arch)()
model.fc = torch.nn.Identity()
missing_unexpected = model.load_state_dict(load_file(ours_path), strict=True)
model.eval()
with torch.no_grad():
    theirs = model(images)
ours = io["features"]
scale = max(1.0, ours.abs().max().item())
ours_error = (theirs - ours).abs().max().item() / scale

torch.manual_seed(1234)
fresh = getattr(torchvision.models, arch)()
with torch.no_grad():
    # Non-trivial running statistics, as trained weights have.
    fresh.train()
    fresh(torch.rand(4, 3, 64, 64))
    fresh.eval()
    fresh_features = torch.flatten(fresh.avgpool(
        fresh.layer4(fresh.layer3(fresh.layer2(fresh.layer1(fresh.maxpool(fresh.relu(fresh.bn1(fresh.conv1(images))))))))), 1)
save_file({k: v.contiguous() for k, v in fresh.state_dict().items()}, f"{out_dir}/torchvision.safetensors")
save_file({"features": fresh_features.contiguous()}, f"{out_dir}/torchvision_features.safetensors")

print(json.dumps({"arch": arch, "torch": torch.__version__, "torchvision": torchvision.__version__,
                  "strict_load": str(missing_unexpected), "max_relative_error": ours_error}))
sys.exit(0 if ours_error <= 1e-4 else 1)
