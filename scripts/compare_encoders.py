#!/usr/bin/env python3
"""How far apart two encoders' weights are: for every tensor the largest absolute difference relative
to the tensor's own scale (its largest magnitude), printed for the worst tensors, and the largest
overall on the last line. Reads the files with safetensors and torch (scripts/setup.sh --python).

Usage: .venv/bin/python scripts/compare_encoders.py A.safetensors B.safetensors [--top N]
e.g. the same demo run with 1 and 2 workers:
    .venv/bin/python scripts/compare_encoders.py runs/w1/encoder.safetensors runs/w2/encoder.safetensors
"""
import argparse
import sys

from safetensors.torch import load_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--top", type=int, default=5, help="tensors to list, worst first")
    args = parser.parse_args()
    a, b = load_file(args.a), load_file(args.b)
    if a.keys() != b.keys():
        only = sorted(set(a) ^ set(b))
        print(f"the encoders have different tensors: {only[:5]}", file=sys.stderr)
        return 1
    rows = []
    for name in sorted(a):
        x, y = a[name].double(), b[name].double()
        if x.shape != y.shape:
            print(f"{name}: shapes {tuple(x.shape)} and {tuple(y.shape)}", file=sys.stderr)
            return 1
        scale = max(x.abs().max().item(), y.abs().max().item(), 1e-12)
        rows.append(((x - y).abs().max().item() / scale, name))
    rows.sort(reverse=True)
    for diff, name in rows[: args.top]:
        print(f"{diff:.3e}  {name}")
    worst = rows[0] if rows else (0.0, "")
    print(f"largest relative difference: {worst[0]:.3e} ({worst[1]}; {len(rows)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
