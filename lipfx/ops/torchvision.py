"""Entries for the functions torchvision wraps with ``torch.fx.wrap`` (they appear as graph nodes).
Registered only when torchvision is installed."""

from __future__ import annotations

import sys

import torch

from .context import NodeContext, Step, Unbounded, constant, unbounded
from .fuzzing import FuzzCase, randn
from .table import OpEntry, table
from .arithmetic import ATTENTION_REASON


def _stochastic_depth_rule(ctx: NodeContext) -> Step:
    if ctx.arg(3, "training", True) and ctx.arg(1, "p", 0.0) > 0:
        raise Unbounded(f"{ctx.label}: stochastic depth traced in training mode is random; trace in eval mode")
    return Step.affine(1.0, "stochastic depth (eval): identity")


def _register() -> None:
    try:
        from torchvision.models import swin_transformer
        from torchvision.ops import stochastic_depth
    except ImportError:
        return

    # called through their modules' globals, which torch.fx.wrap patches while tracing
    depth_module = sys.modules["torchvision.ops.stochastic_depth"]

    def depth_cases(key, g: torch.Generator) -> list[FuzzCase]:
        return [FuzzCase(lambda x: depth_module.stochastic_depth(x, 0.2, "row", False), (randn((2, 3, 4), g),),
                         "eval")]

    def patch_merging_cases(key, g: torch.Generator) -> list[FuzzCase]:
        return [FuzzCase(lambda x: swin_transformer._patch_merging_pad(x), (randn((2, 5, 3, 4), g),), "odd H")]

    for entry in (
        OpEntry((stochastic_depth,), _stochastic_depth_rule, depth_cases, doc="eval: identity"),
        OpEntry((swin_transformer.shifted_window_attention,), unbounded(ATTENTION_REASON), lambda key, g: [],
                doc="unbounded"),
        # zero padding then a permutation of the elements
        OpEntry((swin_transformer._patch_merging_pad,), constant(1.0, "zero pad and regroup: norm 1", linear=True),
                patch_merging_cases, doc="1"),
    ):
        table().add(entry)


_register()
