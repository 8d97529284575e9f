"""The normalization pass: every weighted layer of a GraphModule gets its parametrization.

Which parametrization a module gets is the ``normalization`` piece of its op table entry
(:mod:`lipfx.ops.layers`); this pass only walks the graph, resolves K and registers them.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

import torch.fx as fx
from torch.nn.utils import parametrize

from ..errors import LipfxError
from ..normalization.base import add_size_check
from ..normalization.batching import enable_batching
from ..normalization.constants import KSpec, resolve_K, separable_parent
from ..normalization.options import POWER_ITERS, NormOptions, warn_retired
from ..ops.table import lookup
from ..tracing import input_shapes
from .report import ConversionReport


def normalize(
    gm: fx.GraphModule,
    K: KSpec = 1.0,
    *,
    scaling: str = "hard",
    s_init: float = 3.0,
    power_iters: int = POWER_ITERS,
    batched: bool = True,
    constraint: str = "spectral",
    exclude: Iterable[str] = (),
    eps: Optional[float] = None,
    refresh: Optional[float] = None,
    report: Optional[ConversionReport] = None,
) -> fx.GraphModule:
    """Register a :class:`LipschitzNormalization` on every layer that ``gm``'s graph calls and
    whose op table entry has a ``normalization`` piece (convs, linears, ChannelAffine). In place;
    returns ``gm``.

    ``gm`` needs ``node.meta['tensor_meta']`` (``lipfx.convert`` records it; otherwise run
    ``lipfx.tracing.propagate_shapes``): spatial convs are bounded at their input resolution.

    Args:
        K: one constant for every layer, a dict of module-name patterns to constants (first
            match wins; ``None`` leaves matching layers alone), or ``K(name, module)``.
        scaling: ``"hard"`` (multiply by K) or ``"soft"`` (by K * tanh(s), s learnable).
        s_init: initial s for soft scaling (Runkel et al.: 3 for K <= 20, 0.5 above).
        power_iters: warm-started power steps per training step, for pointwise/linear layers
            (one vector per group) and for the per-frequency blocks of full convs (one vector
            per block). A fixed count, so a training step never waits for the device; the last
            step's residuals are in :func:`lipfx.normalization.power_residuals`.
        batched: compute every normalized weight back to back when a training forward of
            ``gm`` starts (forward hooks on ``gm``), instead of each just before its layer runs.
            Same values and gradients; the bounds' small kernels then run together, before the
            big convolutions have evicted their code and data from the caches, and their
            backward runs together after the network's (MobileNetV2 on a 2-core CPU, batch 32:
            1.022x instead of 1.033x the unnormalized step). With DistributedDataParallel this gives the weight gradients to the
            all-reduce at the end of the backward instead of layer by layer; ``False`` keeps
            them layer by layer. Calling a submodule of ``gm`` directly also computes its
            weights one by one.
        constraint: what conv and linear layers are held to: ``"spectral"`` (norm K: power
            iteration, FFT for spatial convs), ``"orthogonal"`` (pointwise convs and linears: K
            times a (semi-)orthogonal matrix, by a Cayley map, every singular value K; spatial
            convs: K times a BCOP kernel, an isometry or co-isometry on the whole grid) or
            ``"aol"`` (K times the AOL-rescaled weight or kernel, norm <= K, no state).
            Depthwise convs, and spatial convs whose padding repeats pixels (reflect,
            replicate, circular wrapping twice), stay spectral, and the report says why
            (docs/math.md, 15 and 16).
        exclude: names of modules to leave alone (e.g. a last layer with its own parametrization).
        eps, refresh: retired (they steered host-side decisions); ignored, with a warning.
    """
    warn_retired(eps, refresh, "lipfx.normalize")
    options = NormOptions(scaling, s_init, power_iters, constraint)
    exclude = set(exclude)
    sizes = input_shapes(gm)
    modules = dict(gm.named_modules())
    for name, shapes in sizes.items():
        if name in exclude:
            continue
        module = modules[name]
        entry = lookup(type(module))
        if entry is None or entry.normalization is None:
            _warn_opaque(name, module, report)
            continue
        attr = entry.attribute
        if parametrize.is_parametrized(module, attr):
            raise LipfxError(f"layer '{name}' is already parametrized ({attr}); normalize it only once")
        k = resolve_K(K, name, module, separable_parent(name, modules))
        if k is None:
            if report is not None:
                report.add(name, "not-normalized", "K is None")
            continue
        p = entry.normalization(module, shapes, k, options, name)
        parametrize.register_parametrization(module, attr, p)
        if p.size_dependent:
            add_size_check(module)
        if report is not None:
            report.add(name, "normalized", p.extra_repr())
    if batched:
        enable_batching(gm)
    return gm


def _warn_opaque(name: str, module, report: Optional[ConversionReport]) -> None:
    """A module called as one node (a leaf) that holds layers lipfx would normalize: they stay as
    they are, and the certificate uses the leaf's own rule. Say so instead of doing it silently."""
    inner = [n for n, m in module.named_modules() if n and (e := lookup(type(m))) is not None and e.normalization]
    if not inner:
        return
    text = (f"'{name}' ({type(module).__name__}) is traced as one node: its layers {inner[:3]}"
            f"{' ...' if len(inner) > 3 else ''} are not folded, rewritten or normalized")
    warnings.warn(f"lipfx.normalize: {text}", stacklevel=3)
    if report is not None:
        report.add(name, "not-normalized", "opaque leaf: " + text)
