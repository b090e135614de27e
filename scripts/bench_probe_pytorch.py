"""The probe task of worker/examples/bench_probe.rs in plain PyTorch: same shapes, same optimiser, 25
epochs, both splits evaluated after every epoch; bootstrap intervals of the test AUC (1000 resamples,
AUC from ranks, as scikit-learn computes it without ties) in torch. Usage: bench_probe_pytorch.py [THREADS] [REPEATS]"""
import sys
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
torch.set_num_threads(threads)


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, 1, generator=g) >= 0.5).float()
    x = torch.randn(n, 512, generator=g) + y * 0.3
    return x, y


train_x, train_y = data(1013, 1)
test_x, test_y = data(175, 2)


def auc(scores, labels):
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype)
    pos = labels.sum()
    neg = len(labels) - pos
    return ((ranks[labels > 0.5].sum() - pos * (pos + 1) / 2) / (pos * neg)).item()


def task(hidden, dropout, bootstrap):
    torch.manual_seed(0)
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    if hidden == 0:
        model = torch.nn.Linear(512, 1)
    else:
        model = torch.nn.Sequential(
            torch.nn.Dropout(dropout), torch.nn.Linear(512, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(25):
        model.train()
        for idx in torch.randperm(len(xtr)).split(64):
            loss = loss_fn(model(xtr[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for x, y in ((xtr, train_y), (xte, test_y)):
                logits = model(x)
                loss_fn(logits, y).item()
                ((logits.sigmoid() >= 0.5).float() == y).float().mean().item()
    with torch.no_grad():
        scores = model(xte).sigmoid().flatten()
    labels = test_y.flatten()
    auc(scores, labels)
    g = torch.Generator().manual_seed(0)
    for _ in range(bootstrap):
        i = torch.randint(len(scores), (len(scores),), generator=g)
        if 0 < labels[i].sum() < len(i):
            auc(scores[i], labels[i])


print(f"| probe (25 epochs) | bootstrap | ms per task (median of {repeats}) |")
print("|---|---|---|")
for name, hidden, dropout in (("linear", 0, 0.0), ("100 hidden", 100, 0.0), ("500 hidden, dropout 0.2", 500, 0.2)):
    for bootstrap in (0, 1000):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            task(hidden, dropout, bootstrap)
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        print(f"| {name} | {bootstrap} | {times[repeats // 2]:.1f} |")
