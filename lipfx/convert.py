"""``lipfx.convert``: trace a model and rewrite it with the graph passes."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .budget import fit_budget, fit_constants
from .errors import ArgumentError, ShapeError
from .normalization import KSpec, normalize as register_normalization
from .normalization.options import CONSTRAINTS, POWER_ITERS, warn_retired
from .passes import (ConversionReport, fold_batchnorm, remove_batchnorm, replace_activations, replace_global_pooling,
                     rewrite_separable)
from .passes.last_layer import LAST_LAYERS, normalize_last_layer
from .passes.pooling import POOLINGS
from .passes.spatial import SPATIAL, replace_depthwise
from .tracing import Inputs, as_tuple, check_inputs, check_model, eval_mode, trace, wrap_torch_layer

BN_MODES = ("fold", "remove")


def convert(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    K: KSpec = 1.0,
    normalize: bool = True,
    scaling: str = "hard",
    s_init: float = 3.0,
    power_iters: int = POWER_ITERS,
    batched: bool = True,
    bn: Optional[str] = "fold",
    separable: Optional[str] = "exact",
    rank: Optional[int] = None,
    leaf_modules: Iterable[str] = (),
    lipschitz: Optional[float] = None,
    activation: Optional[str] = None,
    constraint: str = "spectral",
    spatial: Optional[str] = None,
    pooling: Optional[str] = None,
    last_layer: Optional[str] = None,
    eps: Optional[float] = None,
    refresh: Optional[float] = None,
) -> fx.GraphModule:
    """Trace ``model`` with torch.fx, rewrite it from depthwise-separable convolutions with
    BatchNorm folded or removed, and (by default) make every layer K-Lipschitz.

    Args:
        model: any torch.fx-traceable module. It is never modified (conversion works on a copy).
        example_inputs: a tensor or tuple of tensors; gives every layer its input resolution.
        K: the per-layer constant: a float, a dict of module-name patterns to floats (first
            match wins, ``None`` = leave unnormalized; a pattern for the original conv name also
            matches both halves of its separable pair), or a callable ``(name, module) -> K``.
        normalize: register :mod:`lipfx.normalization` parametrizations on every conv, linear
            and ChannelAffine, so their norms stay <= K while training. ``False`` gives the
            plain rewrite (same outputs as ``model`` for ``separable="exact"``).
        scaling: ``"hard"`` (norm K) or ``"soft"`` (norm K * tanh(s), s learnable per layer).
        s_init: initial s for soft scaling.
        power_iters: warm power steps per training step for pointwise/linear layers and full
            convs (see :func:`lipfx.normalize`). Depthwise convs are bounded exactly every step.
        batched: compute all normalized weights together at the start of each training forward
            (see :func:`lipfx.normalize`); ``False`` computes each just before its layer.
        bn: ``"fold"`` folds each BatchNorm into the conv/linear right before it, using the
            running statistics (eval semantics), and turns any other BatchNorm into a
            :class:`lipfx.layers.ChannelAffine`; ``"remove"`` drops them all; ``None`` keeps them.
        separable: ``"exact"`` (per-input-channel SVD, same outputs up to rounding),
            ``"lowrank"`` (keep ``rank`` singular values per input channel), ``"fresh"`` (a new
            randomly initialised depthwise + pointwise pair) or ``None`` (leave convs alone).
            Depthwise and 1x1 convs are always kept as they are.
        rank: channel multiplier for ``"lowrank"`` (required) and ``"fresh"`` (default 1).
        leaf_modules: names of submodules to keep opaque when tracing (left as they are).
        lipschitz: a global budget L. With ``normalize``, every layer's K is multiplied by one
            common factor, the largest for which the chain rule with each layer at its K stays
            <= L; since normalized layers never exceed K, the budget then holds throughout
            training (for layers left unnormalized, only for their weights at conversion).
            Without ``normalize``, conv/linear weights are rescaled once to a common norm. The
            choice is in the report (action ``'budget'``), the certificate of the result in
            ``lipfx_certificate``.
        activation: ``"maxmin"``, ``"groupsort"`` or ``"abs"`` replaces every ReLU-like
            activation (ReLU, ReLU6, LeakyReLU, PReLU, ELU, CELU, SELU, GELU, SiLU, Mish, Hardswish;
            modules and functional calls) by that gradient-norm-preserving one
            (:mod:`lipfx.activations`); ``"beta-abs"`` and ``"householder"`` (learnable angles, one
            per channel pair) too. ``None`` keeps them. Changes the function, like ``bn="remove"``.
        constraint: what convs and linear layers are held to with ``normalize``: ``"spectral"``
            (norm K), ``"orthogonal"`` (K times a (semi-)orthogonal matrix, every singular value
            K, starting at the weight's nearest one; a spatial conv kept whole gets an orthogonal
            BCOP kernel, starting at its centre tap) or ``"aol"`` (AOL rescaling, norm <= K).
            Depthwise convs stay spectral (see ``spatial``), and so do convs with reflect or
            replicate padding (the report says why). For a gradient-norm-preserving network,
            combine ``"orthogonal"`` with ``activation``, ``pooling="l2"`` and
            ``last_layer="unit-rows"``.
        spatial: ``"shift"`` replaces every depthwise conv with channel multiplier 1 (all of them
            with ``separable="fresh"``) by a parameter-free :class:`lipfx.layers.Shift`, the only
            norm-preserving depthwise conv; with ``constraint="orthogonal"`` that is LipNeXt's
            family. ``None`` keeps (and spectrally normalizes) them.
        pooling: ``"l2"`` replaces global average pooling (over all spatial dims) by
            :class:`lipfx.layers.L2Pool`, which keeps the norm; ``None`` keeps it.
        last_layer: ``"unit-rows"`` gives the final ``nn.Linear`` (the one whose output the model
            returns) rows of norm 1 (:class:`lipfx.normalization.rows.UnitRows`) and leaves it out
            of the K normalization; pairwise radii (:mod:`lipfx.robust`) use its row differences.
        eps, refresh: retired; ignored, with a warning (see :func:`lipfx.normalize`).

    Returns:
        A ``torch.fx.GraphModule`` whose ``lipfx_report`` (:class:`ConversionReport`) lists what
        was done to each layer, with the relative kernel error of low-rank rewrites. Node
        ``meta['tensor_meta']`` holds each node's shape for ``example_inputs``.
    """
    warn_retired(eps, refresh, "lipfx.convert")
    check_model(model, "lipfx.convert")
    check_inputs(example_inputs)
    if bn not in BN_MODES + (None,):
        raise ArgumentError(f"unknown bn mode {bn!r}; choose from {BN_MODES} or None")
    if constraint not in CONSTRAINTS:  # checked before the (slow) passes run
        raise ArgumentError(f"unknown constraint {constraint!r}; choose from {CONSTRAINTS}")
    if spatial not in SPATIAL + (None,):
        raise ArgumentError(f"unknown spatial {spatial!r}; choose from {SPATIAL} or None")
    if pooling not in POOLINGS + (None,):
        raise ArgumentError(f"unknown pooling {pooling!r}; choose from {POOLINGS} or None")
    if last_layer not in LAST_LAYERS + (None,):
        raise ArgumentError(f"unknown last_layer {last_layer!r}; choose from {LAST_LAYERS} or None")
    work = copy.deepcopy(model)
    work = wrap_torch_layer(work)
    gm = trace(work, leaf_modules)
    report = ConversionReport()
    _propagate_shapes(gm, example_inputs, work)  # the passes check what they fold against shapes
    if bn == "fold":
        fold_batchnorm(gm, report)
    elif bn == "remove":
        remove_batchnorm(gm, report)
    if separable is not None:
        rewrite_separable(gm, separable, rank, report)
    if spatial is not None:
        replace_depthwise(gm, spatial, report)
    if activation is not None:
        replace_activations(gm, activation, report)
    if pooling is not None:
        replace_global_pooling(gm, pooling, report)
    gm.graph.lint()
    gm.recompile()
    _propagate_shapes(gm, example_inputs, work)
    exclude = () if last_layer is None else (normalize_last_layer(gm, last_layer, report),)
    if normalize:
        register_normalization(gm, K, scaling=scaling, s_init=s_init, power_iters=power_iters,
                               batched=batched, constraint=constraint,
                               exclude=exclude, report=report)
    if lipschitz is not None:
        fit = fit_constants if normalize else fit_budget
        gm.lipfx_certificate = fit(gm, lipschitz, example_inputs, report)
    gm.train(model.training)
    gm.lipfx_report = report
    return gm


class _Locate(fx.Interpreter):
    """Runs the graph and remembers the node it failed at (ShapeProp prints a traceback instead)."""

    failed_at: Optional[fx.Node] = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception:
            if self.failed_at is None:
                self.failed_at = n
            raise


@torch.no_grad()
def _propagate_shapes(gm: fx.GraphModule, example_inputs: Inputs, model: nn.Module) -> None:
    """``node.meta['tensor_meta']`` for every node (eval semantics); a ShapeError naming the node,
    its module and the input shapes when the model does not run on ``example_inputs``."""
    inputs = as_tuple(example_inputs)
    prop = _Locate(gm)
    try:
        with eval_mode(gm):
            prop.run(*inputs)
    except Exception as exc:
        cause = exc.__cause__ or exc
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        n = prop.failed_at
        if n is not None and n.op == "call_module":
            where = f"module '{n.target}' ({type(gm.get_submodule(n.target)).__name__})"
        elif n is not None:
            where = f"node '{n.name}' ({getattr(n.target, '__name__', n.target)})"
        else:
            where = type(model).__name__
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ShapeError(f"lipfx.convert: the model does not run on example_inputs of shape {shapes}: {where} failed "
                         f"with {type(cause).__name__}: {text}") from exc
    with eval_mode(gm):
        ShapeProp(gm).propagate(*inputs)
