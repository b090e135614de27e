"""Two spawned processes on loopback with a gloo process group, for the PyTorch side of the
distributed benchmarks (bench_collectives_gloo.py, bench_distributed_step_ddp.py)."""
import socket
import sys

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(worker, rank, port, args, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = worker(rank, *args)
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def run_pair(worker, *args):
    """Runs worker(rank, *args) in 2 processes joined in a gloo group; returns rank 0's result, or exits
    with an error if a process fails (instead of waiting for a result forever)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(worker, r, port, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = None
    while result is None:
        try:
            result = queue.get(timeout=5)
        except Exception:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                sys.exit("a benchmark process failed")
    for p in procs:
        p.join()
    return result
