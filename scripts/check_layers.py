#!/usr/bin/env python3
"""Checks that imports between the top-level modules of a crate form no cycle, and that the worker's
layers import only downwards: session -> phase -> probe -> engine -> comm.

    scripts/check_layers.py          # exit 1, naming the offending file and import, on a violation

Test code (a trailing `#[cfg(test)] mod tests`) and the worker's `testing` module are left out: test
support may reach any layer. `.ci/run` runs this.
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER_LAYERS = ["session", "phase", "probe", "engine", "comm"]  # each may import only those after it
CRATES = {"worker": "simclr_worker", "coordinator": "simclr_coordinator"}
EXEMPT = {"worker": {"testing"}}


def top_module(crate_src: Path, path: Path) -> str:
    rel = path.relative_to(crate_src)
    return rel.parts[0].removesuffix(".rs")


def production_code(text: str) -> str:
    cut = re.search(r"^#\[cfg\(test\)\]\s*\nmod tests\b", text, re.M)
    return text[: cut.start()] if cut else text


def edges(crate: str):
    src = ROOT / crate / "src"
    found = {}
    for path in sorted(src.rglob("*.rs")):
        if "bin" in path.relative_to(src).parts or path.name == "lib.rs":
            continue
        module = top_module(src, path)
        if module in EXEMPT.get(crate, set()):
            continue
        text = production_code(path.read_text())
        for match in re.finditer(r"crate::(\w+)", text):
            target = match.group(1)
            if target != module and target not in EXEMPT.get(crate, set()):
                line = text.count("\n", 0, match.start()) + 1
                found.setdefault((module, target), f"{path.relative_to(ROOT)}:{line}")
    return found


def find_cycle(graph):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, stack + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def main():
    failures = []
    for crate in CRATES:
        found = edges(crate)
        graph = {}
        for (a, b) in found:
            graph.setdefault(a, set()).add(b)
        cycle = find_cycle(graph)
        if cycle:
            hops = [f"{a} -> {b} ({found[(a, b)]})" for a, b in zip(cycle, cycle[1:])]
            failures.append(f"{crate}: import cycle: " + "; ".join(hops))
        if crate == "worker":
            for (a, b), where in sorted(found.items()):
                if a in WORKER_LAYERS and b in WORKER_LAYERS and WORKER_LAYERS.index(b) < WORKER_LAYERS.index(a):
                    failures.append(f"worker: {a} imports {b}, a layer above it ({where})")
    for f in failures:
        print(f"check_layers: {f}", file=sys.stderr)
    if not failures:
        print("check_layers: no import cycles; the worker's layers import only downwards")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
