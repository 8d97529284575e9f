"""Count the places where Python reads a tensor's value: each is a host synchronisation on a GPU.

On an accelerator every ``float(t)``, ``int(t)``, ``bool(t)``, ``t.item()``, ``t.tolist()`` or ``t.cpu()``
blocks the host until the device queue has drained, and breaks ``torch.compile`` graphs. The
counter patches those entry points for the duration of a ``with`` block, on every device, so a
CPU-only test finds the reads a GPU would wait on.

    with count_host_syncs() as syncs:
        loss = net(x).mean(); loss.backward()
    assert syncs.total == 0, syncs
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from typing import Iterator

import torch

_METHODS = ("__float__", "__int__", "__bool__", "__index__", "item", "tolist", "numpy", "cpu")


class HostSyncs:
    """What :func:`count_host_syncs` saw: counts per method and where the first reads came from."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        top = "; ".join(f"{site} x{n}" for site, n in self.sites.most_common(8))
        return f"HostSyncs(total={self.total}, {dict(self.counts)}, at: {top or '-'})"


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count reads of tensor values into Python inside the block (not thread-safe: the patch is
    on ``torch.Tensor`` itself, and is undone on exit)."""
    seen = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in _METHODS}

    def counting(name, original):
        def method(self, *args, **kwargs):
            seen.counts[name] += 1
            frame = _caller()
            if frame is not None:
                seen.sites[f"{frame.filename.rpartition('/')[2]}:{frame.lineno} {name}"] += 1
            return original(self, *args, **kwargs)
        return method

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _caller():
    """The innermost frame outside torch and this module (where the read was written)."""
    for frame in reversed(traceback.extract_stack(limit=12)[:-2]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return frame
    return None
