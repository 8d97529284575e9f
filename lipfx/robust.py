"""Certified robustness from the certificate (docs/math.md, section 9; Tsuzuku et al. 2018).

With logits f, label t and a network bound L, no l2 perturbation smaller than
    (f_t - max_{j != t} f_j) / (sqrt(2) L)
changes the prediction ("global"). When the network ends in a linear layer W on features phi
with bound L_phi, each pair gets its own constant L_phi ||W_t - W_j|| ("pairwise"), usually
much larger radii. Everything here is a *guarantee*: radii come from certified bounds only.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .certify import Certificate, certificate as make_certificate
from .errors import ArgumentError, LipfxError, ShapeError
from .tracing import eval_mode

METHODS = ("pairwise", "global")
DEFAULT_RADII = (0.1, 0.25, 0.5, 36 / 255)
DEFAULT_EPS = DEFAULT_RADII  # the old name, kept for one release
Data = Union[tuple[torch.Tensor, torch.Tensor], Iterable[Sequence[torch.Tensor]]]


class _Logits(NamedTuple):
    values: torch.Tensor  # float64
    unit: float  # the unit roundoff of the dtype the model computed them in


def _logits(model: nn.Module, x: torch.Tensor) -> _Logits:
    # autocast off: the radii are of the model in its own dtype, the function the certificate bounds
    with eval_mode(model), torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2 or not out.is_floating_point():
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeError(f"certified radii need logits of shape (batch, classes >= 2), the model returned {shape}")
    unit = torch.finfo(out.dtype).eps / 2
    if unit > 2.0 ** -24:
        warnings.warn(f"certified radii of a {out.dtype} model allow for the rounding of its logits, not for the "
                      "rounding inside it; certify the model in float32 or float64", RuntimeWarning, stacklevel=3)
    return _Logits(out.double(), unit)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ArgumentError(f"unknown method {method!r}; choose from {METHODS}")


def _check_certificate(cert: Certificate, x: torch.Tensor) -> None:
    if cert.input_shapes and tuple(cert.input_shapes[0][1:]) != tuple(x.shape[1:]):
        raise ShapeError(
            f"the certificate was computed for inputs of shape {tuple(cert.input_shapes[0][1:])}, "
            f"got {tuple(x.shape[1:])}: conv bounds depend on the resolution, certify at this shape"
        )


def final_linear(model: nn.Module, cert: Certificate) -> Optional[tuple[torch.Tensor, float]]:
    """(W, L_phi) when the network's output is a Linear module applied to features phi whose
    certified bound is L_phi; None otherwise. W is the weight the layer uses in eval mode."""
    if len(cert.records) < 2 or cert.records[-1].op != "output":
        return None
    last = cert.record(cert.records[-1].inputs[0]) if cert.records[-1].inputs else None
    if last is None or len(last.inputs) != 1:
        return None
    try:
        module = model.get_submodule(last.target)
    except AttributeError:
        return None
    if not isinstance(module, nn.Linear):
        return None
    with eval_mode(module), torch.no_grad():  # eval: the normalized weight, no power-iteration step
        weight = module.weight.detach().double().clone()
    return weight, cert.record(last.inputs[0]).bound


def pairwise_lipschitz(model: nn.Module, cert: Certificate) -> Optional[torch.Tensor]:
    """(C, C) matrix of certified constants of f_i - f_j, or None without a final linear layer."""
    found = final_linear(model, cert)
    if found is None:
        return None
    weight, l_phi = found
    return l_phi * torch.cdist(weight, weight)


def certified_radius(
    model: nn.Module,
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    certificate: Optional[Certificate] = None,
    method: str = "pairwise",
) -> torch.Tensor:
    """One l2 radius per input within which the prediction provably does not change.

    Args:
        model: a classifier returning (batch, classes) logits; evaluated in eval mode.
        x: a batch of inputs.
        y: labels; where the prediction is wrong the radius is 0.
        certificate: a certificate of ``model`` at ``x``'s shape (computed when not given).
        method: ``"pairwise"`` (the last linear layer's row differences when the network ends in
            one; never smaller than ``"global"``) or ``"global"`` (margin / (sqrt(2) L)).

    An infinite certificate gives radius 0 everywhere, with a warning naming the culprits.
    """
    _check_method(method)
    cert = certificate if certificate is not None else make_certificate(model, x[:1])
    _check_certificate(cert, x)
    return _radii(_logits(model, x), y, cert, _pair_constants(model, cert, method))


def _pair_constants(model: nn.Module, cert: Certificate, method: str) -> Optional[torch.Tensor]:
    finite = math.isfinite(cert.bound)
    return pairwise_lipschitz(model, cert) if method == "pairwise" and finite else None


def _radii(computed: _Logits, y: Optional[torch.Tensor], cert: Certificate,
           pair: Optional[torch.Tensor]) -> torch.Tensor:
    """Radii from logits (see certified_radius); ``pair``: pairwise constants or None.

    The logits are the model's rounded outputs: each is within u |f| of the exact value (u the
    unit roundoff of their dtype), at x and again at x + d, where |f| has grown by at most L r.
    So a pair's margin counts 2u(|f_t| + |f_j|) less and its constant 2uL more. Logits near
    3e4 in float32, or near 8 in bfloat16, flipped well inside radii taken without this."""
    logits, u = computed
    pred = logits.argmax(1)
    if y is not None and (y.dim() != 1 or len(y) != len(logits)):
        raise ShapeError(f"labels of shape {tuple(y.shape)} for {len(logits)} inputs: give one class index per input")
    target = pred if y is None else y.to(pred.device).long()
    zero = torch.zeros(len(logits), dtype=torch.float64)
    if math.isinf(cert.bound) or math.isnan(cert.bound):
        culprits = "; ".join(c.reason for c in cert.unbounded) or "unknown"
        warnings.warn(f"the certificate is infinite ({culprits}): every certified radius is 0", RuntimeWarning, stacklevel=3)
        return zero
    size = logits.abs()
    gaps = logits.gather(1, target[:, None]) - logits - 2 * u * (size.gather(1, target[:, None]) + size)  # f_t - f_j, less rounding
    others = torch.ones_like(gaps, dtype=torch.bool).scatter_(1, target[:, None], False)
    margin = gaps.masked_fill(~others, math.inf).amin(1)
    slack = 2 * u * cert.bound  # each logit moves by at most L r, so its rounding by u L r more
    radius = (margin / (math.sqrt(2) * cert.bound + slack)) if cert.bound > 0 else torch.where(margin > 0, math.inf, 0.0)
    if pair is not None:
        const = pair.to(gaps.device)[target] + slack  # (B, C): constant of f_t - f_j, and of its rounding
        per_pair = torch.where(const > 0, gaps / const, torch.where(gaps > 0, math.inf, 0.0))
        radius = torch.maximum(radius, per_pair.masked_fill(~others, math.inf).amin(1))
    radius = radius.clamp_min(0.0).cpu()
    if y is not None:
        radius = torch.where((pred == target).cpu(), radius, zero)
    return radius


@dataclass
class RobustAccuracy:
    """Clean accuracy and certified accuracy (certified radius >= r, for each r in
    ``certified``) over a dataset."""

    clean: float
    certified: dict[float, float]
    n: int
    bound: float
    method: str
    radii: torch.Tensor = field(repr=False)

    def __str__(self) -> str:
        lines = [f"{self.n} inputs, network bound {self.bound:.4g}, {self.method} radii",
                 f"  clean accuracy       {self.clean:7.2%}"]
        for r, acc in self.certified.items():
            lines.append(f"  certified @ eps={r:<7.4g} {acc:7.2%}")  # label read by tests/test_recipes.py
        return "\n".join(lines)


def certified_accuracy(
    model: nn.Module,
    data: Data,
    radius: Union[float, Sequence[float], None] = None,
    *,
    certificate: Optional[Certificate] = None,
    method: str = "pairwise",
    batch_size: int = 256,
    progress: Optional[bool] = None,
    eps: Union[float, Sequence[float], None] = None,
) -> RobustAccuracy:
    """Clean and certified accuracy at each l2 ``radius`` (one or several; default
    :data:`DEFAULT_RADII`) over ``data``.

    ``data``: a pair of tensors ``(x, y)`` or an iterable of ``(x, y)`` batches (a DataLoader).
    The certificate is computed once, from the first batch's input shape. ``progress``: show
    a progress line on stderr (``None``: only on a terminal, once the run takes over 2 s).
    ``eps``: the old name of ``radius`` (deprecated: a DeprecationWarning).
    """
    _check_method(method)
    radius = _radius_argument("certified_accuracy", radius, eps, DEFAULT_RADII)
    radii_at = (float(radius),) if isinstance(radius, (int, float)) else tuple(float(r) for r in radius)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x_all, y_all = data
        if len(x_all) != len(y_all):
            raise ShapeError(f"data: {len(x_all)} inputs but {len(y_all)} labels")
        batches: Iterable = ((x_all[i:i + batch_size], y_all[i:i + batch_size]) for i in range(0, len(x_all), batch_size))
        total: Optional[int] = math.ceil(len(x_all) / batch_size)
    else:
        batches, total = data, (len(data) if hasattr(data, "__len__") else None)
    show = _Progress(total, progress)
    radii, correct = [], []
    cert, pair = certificate, None
    for i, batch in enumerate(batches):
        x, y = batch[0], batch[1]
        if i == 0:  # one certificate and one set of pairwise constants for the whole run
            cert = cert if cert is not None else make_certificate(model, x[:1])
            pair = _pair_constants(model, cert, method)
        _check_certificate(cert, x)
        logits = _logits(model, x)
        radii.append(_radii(logits, y, cert, pair))
        correct.append(logits.values.argmax(1).cpu() == y.cpu())
        show.update(i + 1)
    show.close()
    if not radii:
        raise LipfxError("certified_accuracy: data is empty")
    radii = torch.cat(radii)
    right = torch.cat(correct)
    n = len(radii)
    return RobustAccuracy(
        clean=float(right.double().mean()),
        certified={r: float(((radii >= r) & right).double().sum() / n) for r in radii_at},
        n=n, bound=cert.bound, method=method, radii=radii,
    )


class _Progress:
    """A one-line progress display on stderr for long runs."""

    def __init__(self, total: Optional[int], enabled: Optional[bool]) -> None:
        self.total, self.enabled, self.start, self.shown = total, enabled, time.monotonic(), False

    def update(self, done: int) -> None:
        if self.enabled is False:
            return
        if self.enabled is None and not (sys.stderr.isatty() and time.monotonic() - self.start > 2.0):
            return
        of = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\rcertifying: batch {done}{of}, {time.monotonic() - self.start:.0f}s")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


def margin_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    radius: Optional[float] = None,
    lipschitz: Union[float, torch.Tensor, None] = None,
    temperature: float = 0.25,
    *,
    eps: Optional[float] = None,
) -> torch.Tensor:
    """Lipschitz-margin loss (Tsuzuku et al. 2018): cross-entropy of logits whose non-target
    entries are raised by the largest change a perturbation of l2 norm ``radius`` could make,
    at a temperature.

    Args:
        logits: (batch, classes).
        y: labels.
        radius: the l2 radius to train for.
        lipschitz: the network's bound L (margin sqrt(2) * radius * L for every class), or a
            (C, C) matrix of pairwise constants of f_i - f_j (margin radius * K[y, j]), e.g.
            :func:`pairwise_lipschitz`.
        temperature: logits are divided by it before the softmax. Lipschitz-bounded logits
            span a small range, so a temperature below 1 is what makes the loss train.
        eps: the old name of ``radius`` (deprecated: a DeprecationWarning).
    """
    radius = _radius_argument("margin_loss", radius, eps, None)
    if radius is None:
        raise ArgumentError("margin_loss needs radius (the l2 radius to train for)")
    if lipschitz is None:
        raise ArgumentError("margin_loss needs lipschitz (the network's bound, or pairwise constants)")
    if not temperature > 0:
        raise ArgumentError(f"temperature must be positive, got {temperature}")
    if isinstance(lipschitz, torch.Tensor) and lipschitz.dim() == 2:
        margin = radius * lipschitz.to(logits)[y]
    else:
        margin = math.sqrt(2) * radius * float(lipschitz) * torch.ones_like(logits)
    margin = margin.scatter(1, y[:, None], 0.0)
    return nn.functional.cross_entropy((logits + margin) / temperature, y)


def _radius_argument(who: str, radius, eps, default):
    """``radius``, or the deprecated ``eps`` with a DeprecationWarning; both is an error."""
    if eps is not None:
        if radius is not None:
            raise ArgumentError(f"{who}: pass radius only (eps is its deprecated old name), not both")
        warnings.warn(f"{who}(eps=...) is deprecated: the l2 radius is now called radius=", DeprecationWarning,
                      stacklevel=3)
        return eps
    return default if radius is None else radius
