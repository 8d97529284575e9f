"""A global Lipschitz budget: per-layer constants chosen so the network's certificate is <= L.

Normalized networks (:func:`fit_constants`): every layer's K is multiplied by one common factor,
the largest for which the chain rule with each layer at its K stays within the budget; the
budget then holds for any weights the layers take in training. Plain networks
(:func:`fit_budget`): every conv and linear weight is rescaled once to one common norm. Both
searches re-evaluate the chain rule with scaled factors (:meth:`Certificate.evaluate`), so they
cost no new norm computations; the result is then certified from the actual weights.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.fx as fx
from torch import nn

from .certify import Certificate, certificate
from .errors import ArgumentError, LipfxError
from .normalization import normalized_layers
from .passes.report import ConversionReport
from .tracing import Inputs

SCALED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_TARGET = 1 - 1e-6  # aim just below the budget: float32 weights round after rescaling


def layer_norms(gm: fx.GraphModule, cert: Certificate, names: Optional[Iterable[str]] = None) -> dict[str, float]:
    """The certified norm of every conv/linear module (or of the modules ``names``) on the graph."""
    modules = dict(gm.named_modules())
    wanted = None if names is None else set(names)
    norms: dict[str, float] = {}
    for r in cert.records:
        if (r.target in wanted) if wanted is not None else isinstance(modules.get(r.target), SCALED):
            norms[r.target] = max(norms.get(r.target, 0.0), r.local)
    return norms


def allocate(cert: Certificate, norms: dict[str, float], lipschitz: float) -> float:
    """Largest common per-layer norm K with ``cert.evaluate`` <= ``lipschitz`` (bisection)."""
    return largest_within(lambda k: cert.evaluate({name: k / n for name, n in norms.items() if n > 0}), lipschitz)


def largest_within(value: Callable[[float], float], lipschitz: float) -> float:
    """Largest t >= 0 with value(t) <= lipschitz (value non-decreasing), by bisection."""
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


def _check_budget(lipschitz: float) -> None:
    if not lipschitz > 0 or math.isinf(lipschitz):
        raise ArgumentError(f"lipschitz must be a positive finite number, got {lipschitz}")


def _within(gm: fx.GraphModule, example_inputs: Inputs, method: str, lipschitz: float, chose: str) -> Certificate:
    """Certify the result from its weights; exceeding the budget here is a bug in the search."""
    final = certificate(gm, example_inputs, method=method)
    if final.bound > lipschitz:
        raise LipfxError(f"internal error: budget {lipschitz} chose {chose} but the certificate is {final.bound:.6g}")
    return final


def _finite(cert: Certificate) -> Certificate:
    if math.isinf(cert.bound):
        names = "; ".join(c.reason for c in cert.unbounded)
        raise LipfxError(f"cannot fit a Lipschitz budget: the certificate is infinite because of: {names}")
    return cert


@torch.no_grad()
def fit_constants(
    gm: fx.GraphModule,
    lipschitz: float,
    example_inputs: Inputs,
    report: Optional[ConversionReport] = None,
    method: str = "auto",
) -> Certificate:
    """Multiply every normalized layer's K by one common factor t so the network stays <= L.

    t is chosen on the plain chain rule (no composed or dense bounds) with each normalized
    layer's factor set to its K: normalized layers never exceed K in eval mode, so that bound
    -- and the budget -- keeps holding whatever training does to the weights. Returns the
    certificate of the result (composition can only make it smaller).
    """
    _check_budget(lipschitz)
    # an infinite certificate first: its culprits say more than "no normalized layers" would
    plain = _finite(certificate(gm, example_inputs, method=method, compose_linear=False, dense_max=0))
    layers = {name: p for name, _, p in normalized_layers(gm)}
    if not layers:
        raise LipfxError("no normalized layers to fit a budget with (all K were None?)")
    local = layer_norms(gm, plain, layers)
    for name in layers:
        if local.get(name, 0.0) <= 0:
            raise LipfxError(f"layer '{name}' has an all-zero weight: its certified factor cannot scale with K")
    t = largest_within(lambda t: plain.evaluate({n: t * layers[n].constant() / local[n] for n in layers}), lipschitz)
    for name, p in layers.items():
        old = float(p.K)
        exact = old * t
        k = torch.tensor(exact, dtype=p.K.dtype)
        if float(k) > exact:  # K is stored in the weights' dtype: round it down, never up
            k = torch.nextafter(k, torch.zeros_like(k))
        p.K.copy_(k)
        if report is not None:
            report.add(name, "budget", f"K {old:.4g} -> {float(p.K):.4g}")
    return _within(gm, example_inputs, method, lipschitz, f"a factor {t:.6g}")


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
    _check_budget(lipschitz)
    cert = _finite(certificate(gm, example_inputs, method=method))
    norms = layer_norms(gm, cert)
    k = allocate(cert, norms, lipschitz)
    for name, n in norms.items():
        if n > 0:
            module = gm.get_submodule(name)
            module.weight.mul_(k / n)
    final = _within(gm, example_inputs, method, lipschitz, f"per-layer norm {k:.6g}")
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
