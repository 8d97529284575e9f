"""``lipfx.convert``: trace a model and rewrite it with the graph passes."""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch.fx as fx
from torch import nn

from .budget import fit_budget
from .passes import ConversionReport, fold_batchnorm, remove_batchnorm, rewrite_separable
from .tracing import Inputs, propagate_shapes, trace

BN_MODES = ("fold", "remove")


def convert(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    bn: Optional[str] = "fold",
    separable: Optional[str] = "exact",
    rank: Optional[int] = None,
    leaf_modules: Iterable[str] = (),
    lipschitz: Optional[float] = None,
) -> fx.GraphModule:
    """Trace ``model`` with torch.fx and return an equivalent GraphModule built from
    depthwise-separable convolutions, with BatchNorm folded or removed.

    Args:
        model: any torch.fx-traceable module. It is never modified (conversion works on a copy).
        example_inputs: a tensor or tuple of tensors; gives every layer its input resolution.
        bn: ``"fold"`` folds each BatchNorm into the conv/linear right before it, using the
            running statistics (eval semantics), and turns any other BatchNorm into a
            :class:`lipfx.layers.ChannelAffine`; ``"remove"`` drops them all; ``None`` keeps them.
        separable: ``"exact"`` (per-input-channel SVD, same outputs up to rounding),
            ``"lowrank"`` (keep ``rank`` singular values per input channel), ``"fresh"`` (a new
            randomly initialised depthwise + pointwise pair) or ``None`` (leave convs alone).
            Depthwise and 1x1 convs are always kept as they are.
        rank: channel multiplier for ``"lowrank"`` (required) and ``"fresh"`` (default 1).
        leaf_modules: names of submodules to keep opaque when tracing (left as they are).
        lipschitz: a global budget L: every conv/linear layer is rescaled to one common norm K,
            the largest for which the certificate (:func:`lipfx.certificate`) is <= L; the
            result is certified again from the new weights. The chosen norms are in the report
            (action ``'budget'``) and the final certificate in ``lipfx_certificate``.

    Returns:
        A ``torch.fx.GraphModule`` whose ``lipfx_report`` (:class:`ConversionReport`) lists what
        was done to each layer, with the relative kernel error of low-rank rewrites. Node
        ``meta['tensor_meta']`` holds each node's shape for ``example_inputs``.
    """
    if bn not in BN_MODES + (None,):
        raise ValueError(f"unknown bn mode {bn!r}; choose from {BN_MODES} or None")
    work = copy.deepcopy(model)
    gm = trace(work, leaf_modules)
    report = ConversionReport()
    if bn == "fold":
        fold_batchnorm(gm, report)
    elif bn == "remove":
        remove_batchnorm(gm, report)
    if separable is not None:
        rewrite_separable(gm, separable, rank, report)
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, example_inputs)
    if lipschitz is not None:
        gm.lipfx_certificate = fit_budget(gm, lipschitz, example_inputs, report)
    gm.train(model.training)
    gm.lipfx_report = report
    return gm
