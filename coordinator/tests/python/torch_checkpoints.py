"""PyTorch's side of coordinator/tests/import_weights.rs.

    python torch_checkpoints.py write DIR   # checkpoints as the libraries save them, and their features
    python torch_checkpoints.py check DIR   # each DIR/NAME.imported.safetensors against its source model

`write` saves, with torch itself, one checkpoint per layout import-weights reads, and for each the
eval-mode features its own model computes for DIR/images.safetensors:
- a torchvision ResNet-18 state dict (zip format) with a channels-last conv weight and a transposed
  classifier (strided storages);
- a torchvision ResNet-50 in torch's legacy (pre-1.6, non-zip) format;
- a ResNet-18 in half precision;
- a solo-learn-style Lightning checkpoint: state_dict with backbone., momentum_backbone., projector.
  and classifier., SGD optimizer states, hyper-parameters;
- lightly's nn.Sequential(*children[:-1]) backbone inside a SimCLR module, with a projection head;
- a MoCo checkpoint under DataParallel (module.encoder_q. and module.encoder_k.);
- a ResNet-18 as safetensors (as timm's downloads are);
- a TorchScript archive of a ResNet-18 (torch.jit.save).
`check` loads each imported file into torchvision's model with strict=True and compares features.
Prints one JSON line per case; exits 1 when any differs by more than 1e-4 of the features' scale.
"""
import collections
import json
import sys

import torch
import torchvision
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)
mode, out = sys.argv[1], sys.argv[2]


def trained(model, seed):
    """Weights and running statistics that are not the initial ones."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.train()
        model(torch.rand(4, 3, 64, 64))
    return model.eval()


def features(backbone, images):
    with torch.no_grad():
        return torch.flatten(backbone(images), 1).contiguous()


def headless(model):
    model.fc = torch.nn.Identity()
    return model


if mode == "write":
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    save_file({"images": images}, f"{out}/images.safetensors")
    cases = []

    def case(name, arch, model_features, **extra):
        save_file({"features": model_features}, f"{out}/{name}.features.safetensors")
        cases.append({"name": name, "arch": arch, **extra})

    # torchvision ResNet-18, zip format, strided tensors.
    m = trained(torchvision.models.resnet18(), 1)
    sd = m.state_dict()
    sd["conv1.weight"] = sd["conv1.weight"].contiguous(memory_format=torch.channels_last)
    sd["fc.weight"] = sd["fc.weight"].t().contiguous().t()
    assert not sd["conv1.weight"].is_contiguous() and not sd["fc.weight"].is_contiguous()
    torch.save(sd, f"{out}/torchvision18.pth")
    case("torchvision18", "resnet18", features(headless(m), images), file="torchvision18.pth",
         format="torchvision", classifier=True)

    # torchvision ResNet-50 in the legacy format.
    m = trained(torchvision.models.resnet50(), 2)
    torch.save(m.state_dict(), f"{out}/legacy50.pth", _use_new_zipfile_serialization=False)
    case("legacy50", "resnet50", features(headless(m), images), file="legacy50.pth", format="torchvision",
         classifier=True)

    # Half precision: the reference runs the same rounded weights in float32.
    m = trained(torchvision.models.resnet18(), 3).half()
    torch.save(m.state_dict(), f"{out}/half18.pt")
    case("half18", "resnet18", features(headless(m.float()), images), file="half18.pt", format="torchvision",
         classifier=True)

    # solo-learn: a Lightning checkpoint; the encoder is `backbone`, without its classifier.
    backbone = headless(trained(torchvision.models.resnet18(), 4))
    momentum = headless(trained(torchvision.models.resnet18(), 5))
    projector = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    classifier = torch.nn.Linear(512, 10)
    module = torch.nn.ModuleDict({"backbone": backbone, "momentum_backbone": momentum, "projector": projector,
                                  "classifier": classifier})
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    loss = module["projector"](module["backbone"](torch.rand(2, 3, 64, 64))).sum()
    loss.backward()
    optimizer.step()
    module.eval()
    ckpt = {
        "epoch": 99,
        "global_step": 12345,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": collections.OrderedDict(module.state_dict()),
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [{"last_epoch": 99, "base_lrs": [0.1]}],
        "hyper_parameters": {"backbone": {"name": "resnet18"}, "method": "simclr", "max_epochs": 100},
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5)}},
    }
    torch.save(ckpt, f"{out}/solo.ckpt")
    case("solo", "resnet18", features(module["backbone"], images), file="solo.ckpt", format="solo-learn",
         classifier=False)

    # lightly: the backbone as numbered children.
    class SimCLR(torch.nn.Module):
        def __init__(self):
            super().__init__()
            resnet = trained(torchvision.models.resnet18(), 6)
            self.backbone = torch.nn.Sequential(*list(resnet.children())[:-1])
            self.projection_head = torch.nn.Sequential(torch.nn.Linear(512, 128), torch.nn.ReLU(),
                                                       torch.nn.Linear(128, 32))

    model = SimCLR().eval()
    torch.save(model.state_dict(), f"{out}/lightly.pth")
    case("lightly", "resnet18", features(model.backbone, images), file="lightly.pth", format="lightly",
         classifier=False)

    # MoCo under DataParallel: the query encoder is the one to take.
    q = trained(torchvision.models.resnet18(), 7)
    k = trained(torchvision.models.resnet18(), 8)
    sd = {f"module.encoder_q.{n}": t for n, t in q.state_dict().items()}
    sd.update({f"module.encoder_k.{n}": t for n, t in k.state_dict().items()})
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, f"{out}/moco.pth.tar")
    case("moco", "resnet18", features(headless(q), images), file="moco.pth.tar", format="torchvision",
         classifier=True)

    # safetensors with torchvision's (and timm's) names.
    m = trained(torchvision.models.resnet18(), 9)
    save_file({n: t.contiguous() for n, t in m.state_dict().items()}, f"{out}/timm18.safetensors")
    case("timm18", "resnet18", features(headless(m), images), file="timm18.safetensors", format="timm",
         classifier=True)

    # An extra tensor under the encoder's names (left out, or refused with --strict).
    sd = torchvision.models.resnet18().state_dict()
    sd["conv1.bias"] = torch.zeros(64)
    torch.save(sd, f"{out}/extra18.pth")

    # TorchScript: the module's attributes are pickled as objects' states.
    m = trained(torchvision.models.resnet18(), 10)
    torch.jit.save(torch.jit.script(m), f"{out}/scripted.pt")
    case("scripted", "resnet18", features(headless(m), images), file="scripted.pt", format="torchvision",
         classifier=True)

    with open(f"{out}/cases.json", "w") as f:
        json.dump(cases, f)
    print(json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__, "cases": len(cases)}))

elif mode == "check":
    images = load_file(f"{out}/images.safetensors")["images"]
    worst = 0.0
    for c in json.load(open(f"{out}/cases.json")):
        model = getattr(torchvision.models, c["arch"])()
        state = load_file(f"{out}/{c['name']}.imported.safetensors")
        if not c["classifier"]:
            model.fc = torch.nn.Identity()
        result = model.load_state_dict(state, strict=True)
        ours = features(headless(model.eval()), images)
        theirs = load_file(f"{out}/{c['name']}.features.safetensors")["features"]
        error = (ours - theirs).abs().max().item() / max(1.0, theirs.abs().max().item())
        worst = max(worst, error)
        print(json.dumps({"case": c["name"], "strict_load": str(result), "max_relative_error": error}))
    sys.exit(0 if worst <= 1e-4 else 1)
