"""Run by tests/test_normalization.py: train a converted model under DistributedDataParallel with
2 gloo processes on CPU, each rank on its own data, then save every rank's state_dict."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lipfx


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    ).eval()


def worker(rank: int, world: int, out: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.randn(1, 3, 8, 8)
    net = lipfx.convert(model(), x, K=2.0, scaling="soft")
    torch.manual_seed(1000 + rank)  # different buffers and data per rank: DDP must reconcile them
    for _, _, p in lipfx.normalized_layers(net):
        if hasattr(p, "v"):
            p.v.normal_()
    if rank == 0:
        torch.save(net.state_dict(), os.path.join(out, "start.pt"))
    ddp = DistributedDataParallel(net.train())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(5):
        xb, yb = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(xb), yb).backward()
        opt.step()
    ddp(torch.randn(2, 3, 8, 8))  # a last forward: buffers are synced from rank 0 first
    torch.save(net.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # gloo: a rank destroying the group while the other still works can abort at exit
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    mp.spawn(worker, args=(2, sys.argv[1]), nprocs=2, join=True)
