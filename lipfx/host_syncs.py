"""Count the places where a tensor's value is read on the host: each is a synchronisation on a GPU.

On an accelerator every ``float(t)``, ``int(t)``, ``bool(t)``, ``t.item()``, indexing with a 0-d
tensor, a boolean mask or ``nonzero`` (whose output size depends on the values) blocks the host
until the device queue has drained, and breaks ``torch.compile`` graphs. So does a tensor made
from host data (``torch.tensor([...], device=...)``: a blocking host-to-device copy). The counter
watches the dispatcher for the ops that read values (``aten._local_scalar_dense``, ``is_nonzero``,
``equal``, ``nonzero``, ...) or bring host data in (``lift_fresh``, which every ``torch.tensor``
goes through, on the CPU too) and patches the entry points that bypass it (``tolist``, ``numpy``,
``cpu``), on every device, so a CPU-only test finds the waits a GPU would have.

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
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose result is a host value, or whose output shape depends on tensor values
_SYNC_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "nonzero_static",
                       "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                       "unique_dim_consecutive", "repeat_interleave", "bincount", "histc",
                       "lift_fresh"})  # a tensor made from host data: a blocking copy onto an accelerator
_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})
_METHODS = ("tolist", "numpy", "cpu")  # read memory directly, without an aten op


class HostSyncs:
    """What :func:`count_host_syncs` saw: counts per op and where the reads were written."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.sites: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, name: str) -> None:
        self.counts[name] += 1
        frame = _caller()
        if frame is not None:
            self.sites[f"{frame.filename.rpartition('/')[2]}:{frame.lineno} {name}"] += 1

    def __repr__(self) -> str:
        top = "; ".join(f"{site} x{n}" for site, n in self.sites.most_common(8))
        return f"HostSyncs(total={self.total}, {dict(self.counts)}, at: {top or '-'})"


class _Watch(TorchDispatchMode):
    def __init__(self, seen: HostSyncs) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS or (name in _INDEX_OPS and _has_mask(args)):
            self.seen.record(name)
        return func(*args, **(kwargs or {}))


def _has_mask(args: tuple) -> bool:
    """A boolean index: its output size depends on the values (a nonzero inside the kernel)."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Count reads of tensor values on the host inside the block (this thread's dispatcher, and
    ``torch.Tensor``'s direct readers, patched until exit: not thread-safe)."""
    seen = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in _METHODS}

    def counting(name, original):
        def method(self, *args, **kwargs):
            seen.record(name)
            return original(self, *args, **kwargs)
        return method

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        with _Watch(seen):
            yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _caller():
    """The innermost frame outside torch and this module (where the read was written)."""
    for frame in reversed(traceback.extract_stack(limit=16)[:-3]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return frame
    return None
