"""Training steps and round trips shared by tests."""

import torch
import torch.nn.functional as F
from torch import nn

import lipfx
from lipfx.host_syncs import count_host_syncs


def host_reads_while_training(gm: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-2) -> int:
    """Host reads in two SGD steps after a first one (SGD: CPU Adam reads its step count)."""
    opt = torch.optim.SGD(gm.parameters(), lr=lr, momentum=0.9)

    def step():
        loss = F.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    with count_host_syncs() as syncs:
        step()
        step()
    return syncs.total


def assert_round_trip(gm: nn.Module, x: torch.Tensor, path) -> nn.Module:
    """lipfx.save then lipfx.load: the loaded model computes what ``gm`` does in eval mode."""
    lipfx.save(gm, path)
    back = lipfx.load(path)
    gm.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), gm(x))
    return back
