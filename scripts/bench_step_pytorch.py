"""PyTorch side of the SimCLR step benchmark (worker/benches/simclr_step.rs): the same step as a user of
the Python stack would write it. torchvision's ResNet (classifier replaced by the projection head: a
2-layer MLP to 128), grayscale repeated to 3 channels, NT-Xent (tau 0.5) over both views, backward,
and LARS (momentum 0.9, trust coefficient 0.001, weight decay 1e-6, biases and BN excluded), with the
views equal to the inputs (augmentations off), at a fixed thread count.

    python scripts/bench_step_pytorch.py [THREADS] [STEPS] [DEVICE] [PRECISION]

DEVICE is cpu (default) or cuda:K; on a GPU the batches are 256 images and the augmentation table is
skipped, as on the Rust side. PRECISION as the Rust side's `pretrain.precision`: tf32 (default; float32
with TF32 convolutions and products on CUDA), fp32 (TF32 off) or bf16 (torch.autocast in bfloat16 for
the model, the loss in float32, model and input in channels_last: PyTorch's AMP recipe).
"""
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 2
device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cpu")
precision = sys.argv[4] if len(sys.argv) > 4 else "tf32"
if precision not in ("fp32", "tf32", "bf16"):
    sys.exit(f"bench_step_pytorch: '{precision}' is not a precision (fp32, tf32 or bf16)")
torch.set_num_threads(threads)
torch.backends.cudnn.allow_tf32 = precision != "fp32"
torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
memory_format = torch.channels_last if precision == "bf16" else torch.contiguous_format


def nt_xent(z, tau):
    z = F.normalize(z, dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    sim = z @ z.t() / tau
    sim = sim.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, n2), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


@torch.no_grad()
def lars_step(params, buffers, lr, momentum=0.9, eta=0.001, wd=1e-6):
    for p, buf in zip(params, buffers):
        if p.grad is None:
            continue
        d = p.grad
        scaled = lr
        if p.ndim > 1:
            d = d + wd * p
            w_norm, d_norm = p.norm(), d.norm()
            if w_norm > 0 and d_norm > 0:
                scaled = lr * (eta * w_norm / d_norm)
        buf.mul_(momentum).add_(d * scaled)
        p.sub_(buf)


def augmentation_throughput(repeats):
    """The cxr preset with torchvision.transforms.v2, per image (as a Dataset's __getitem__ applies it)."""
    from torchvision.transforms import v2

    print("| augmentation (cxr preset, both views) | batch (images) | images/s |")
    print("|---|---|---|")
    for out, batch in [(64, 256), (224, 64)]:
        kernel = max(3, int(out * 0.1) // 2 * 2 + 1)
        transform = v2.Compose([
            v2.RandomResizedCrop(out, scale=(0.3, 1.0), antialias=False),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
            v2.RandomApply([v2.Lambda(lambda x: v2.functional.adjust_gamma(x, float(torch.empty(1).uniform_(0.7, 1.4))))], p=0.5),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        ])
        images = torch.rand(batch, 1, 64, 64)
        for image in images:
            transform(image)
        start = time.perf_counter()
        for _ in range(repeats):
            for image in images:
                transform(image), transform(image)
        rate = batch * repeats / (time.perf_counter() - start)
        print(f"| 64x64 -> {out}x{out} | {batch} | {rate:.0f} |")


on_cpu = device.type == "cpu"
if on_cpu:
    augmentation_throughput(steps)
    print()
print(f"| model | input | batch (images) | step time (s) | images/s |")
print("|---|---|---|---|---|")
# The CPU batches fit a 2-core machine's patience; on a GPU every shape takes the realistic 256.
for arch, name, size, cpu_batch in [("resnet18", "ResNet-18", 64, 64), ("resnet18", "ResNet-18", 224, 16),
                                    ("resnet50", "ResNet-50", 64, 32), ("resnet50", "ResNet-50", 224, 8)]:
    batch = cpu_batch if on_cpu else 256
    model = getattr(torchvision.models, arch)()
    features = model.fc.in_features
    model.fc = torch.nn.Sequential(torch.nn.Linear(features, features), torch.nn.ReLU(), torch.nn.Linear(features, 128))
    model.to(device, memory_format=memory_format)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [torch.zeros_like(p) for p in params]
    images = torch.rand(batch, 1, size, size)

    def step():
        # The batch comes from host memory and the loss goes back to it, as on the Rust side.
        x = images.to(device)
        views = torch.cat([x, x]).repeat(1, 3, 1, 1).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            z = model(views)
        loss = nt_xent(z.float(), 0.5)
        model.zero_grad(set_to_none=True)
        loss.backward()
        lars_step(params, buffers, 0.3 * batch / 256)
        return loss.item()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - start) / steps
    print(f"| {name} | {size}x{size} | {batch} | {per_step:.3f} | {batch / per_step:.1f} |")
