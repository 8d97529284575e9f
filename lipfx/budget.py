"""A global Lipschitz budget: per-layer constants chosen so the network's certificate is <= L.

Every conv and linear layer gets the same operator norm K (its weight is rescaled to it), and K
is the largest value for which the certificate's chain rule stays within the budget. The search
re-evaluates the chain rule with scaled factors (:meth:`Certificate.evaluate`), so it costs no
new norm computations; the result is then certified from the rescaled weights.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from .certify import Certificate, certificate
from .errors import LipfxError
from .passes.report import ConversionReport
from .tracing import Inputs

SCALED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_TARGET = 1 - 1e-6  # aim just below the budget: float32 weights round after rescaling


def layer_norms(gm: fx.GraphModule, cert: Certificate) -> dict[str, float]:
    """The certified norm of every conv/linear module on the certificate's graph."""
    modules = dict(gm.named_modules())
    norms: dict[str, float] = {}
    for r in cert.records:
        if isinstance(modules.get(r.target), SCALED):
            norms[r.target] = max(norms.get(r.target, 0.0), r.local)
    return norms


def allocate(cert: Certificate, norms: dict[str, float], lipschitz: float) -> float:
    """Largest common per-layer norm K with ``cert.evaluate`` <= ``lipschitz`` (bisection)."""

    def value(k: float) -> float:
        return cert.evaluate({name: k / n for name, n in norms.items() if n > 0})

    floor = value(0.0)
    if floor > lipschitz * _TARGET:
        raise LipfxError(
            f"budget lipschitz={lipschitz} is unreachable: with every conv/linear layer scaled to 0 the "
            f"certificate is still {floor:.4g} (identity shortcuts or fixed layers)"
        )
    lo, hi = 0.0, 1.0
    while value(hi) <= lipschitz * _TARGET:
        lo, hi = hi, hi * 2
        if hi > 1e12:
            raise LipfxError("budget search diverged: the certificate does not grow with the layer norms")
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if value(mid) <= lipschitz * _TARGET else (lo, mid)
    return lo


@torch.no_grad()
def fit_budget(
    gm: fx.GraphModule,
    lipschitz: float,
    example_inputs: Inputs,
    report: Optional[ConversionReport] = None,
    method: str = "auto",
) -> Certificate:
    """Rescale every conv/linear weight of ``gm`` in place so its certificate is <= ``lipschitz``.

    Returns the certificate of the rescaled network (computed from its weights, not from K).
    Raises LipfxError naming the culprits when the network has no finite certificate.
    """
    if not lipschitz > 0 or math.isinf(lipschitz):
        raise LipfxError(f"lipschitz must be a positive finite number, got {lipschitz}")
    cert = certificate(gm, example_inputs, method=method)
    if math.isinf(cert.bound):
        names = "; ".join(c.reason for c in cert.unbounded)
        raise LipfxError(f"cannot fit a Lipschitz budget: the certificate is infinite because of: {names}")
    norms = layer_norms(gm, cert)
    k = allocate(cert, norms, lipschitz)
    for name, n in norms.items():
        if n > 0:
            module = gm.get_submodule(name)
            module.weight.mul_(k / n)
    final = certificate(gm, example_inputs, method=method)
    if final.bound > lipschitz:
        raise LipfxError(f"internal error: budget {lipschitz} chose per-layer norm {k:.6g} but the certificate is {final.bound:.6g}")
    # Dense linear regions can make the real certificate smaller than the search assumed; use
    # the slack with a common extra factor t (cert grows like t^p, p = scaled layers on the
    # critical path), kept only when the recomputed certificate stays within the budget.
    scaled = [gm.get_submodule(name) for name, n in norms.items() if n > 0]
    if 0 < final.bound < 0.99 * lipschitz:
        depth = max(1, sum(1 for r in final.critical_path() if r.target in norms))
        t = (lipschitz * _TARGET / final.bound) ** (1 / depth)
        for _ in range(4):  # halve the step (geometrically) until the budget holds
            for m in scaled:
                m.weight.mul_(t)
            trial = certificate(gm, example_inputs, method=method)
            if trial.bound <= lipschitz:
                k, final = k * t, trial
                break
            for m in scaled:
                m.weight.div_(t)
            t = math.sqrt(t)
    if report is not None:
        for name, n in norms.items():
            if n > 0:
                report.add(name, "budget", f"norm {n:.4g} -> {k:.4g}")
    return final
