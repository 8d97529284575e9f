"""Per-layer constants K: one float, name patterns, or a callable; changing them later; reading the
layers' state."""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterator, Mapping, Optional, Union

from torch import nn
from torch.nn.utils import parametrize

from ..errors import LipfxError
from ..layers import SeparableConv
from .base import LipschitzNormalization, check_K

KSpec = Union[float, Mapping[str, Optional[float]], Callable[[str, nn.Module], Optional[float]]]


def resolve_K(K: KSpec, name: str, module: nn.Module, parent: Optional[str] = None) -> Optional[float]:
    """The constant for module ``name``: K itself, the first matching pattern, or K(name, module).

    Patterns (``fnmatch``) are tried against the module's name and, for the two halves of a
    depthwise-separable pair, the name of the original conv (``parent``). ``None`` leaves a
    layer unnormalized.
    """
    if callable(K) and not isinstance(K, Mapping):
        value = K(name, module)
    elif isinstance(K, Mapping):
        names = [name] + ([parent] if parent else [])
        for pattern, k in K.items():
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                value = k
                break
        else:
            raise LipfxError(
                f"no K pattern matches layer '{name}' (patterns: {list(K)}); add '*' for a default, "
                "or map a pattern to None to leave layers unnormalized"
            )
    else:
        value = K
    if value is not None:
        check_K(value, name)
    return None if value is None else float(value)


def normalized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, LipschitzNormalization]]:
    """(name, module, parametrization) for every layer lipfx normalized in ``model``."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for plist in module.parametrizations.values():
            for p in plist:
                if isinstance(p, LipschitzNormalization):
                    yield name, module, p


def power_residuals(model: nn.Module) -> dict[str, float]:
    """Each normalized layer's relative uncertainty after its last training step: the power
    iteration's residual ||A^T A v - s^2 v|| / s^2 (pointwise, linear), or for a swept conv
    spectrum the slack of its peak block over the bound (docs/math.md 7.4; the normalized norm is
    then in [K / (1 + 2 slack), K]); 0 where the bound is exact (depthwise convs on small grids,
    ChannelAffine). A training step never reads them; this does, once per layer."""
    return {name: float(p.residual) for name, _, p in normalized_layers(model)}


def set_constants(model: nn.Module, K: KSpec) -> None:
    """Change the per-layer constants of an already normalized model (same rules as ``normalize``)."""
    modules = dict(model.named_modules())
    for name, module, p in normalized_layers(model):
        k = resolve_K(K, name, module, separable_parent(name, modules))
        if k is None:
            raise LipfxError(f"layer '{name}' is normalized; K cannot switch it off (use lipfx.bake first)")
        p.K.fill_(k)


def separable_parent(name: str, modules: Mapping[str, nn.Module]) -> Optional[str]:
    parent = name.rpartition(".")[0]
    return parent if isinstance(modules.get(parent), SeparableConv) else None
