"""Entries for the identity and for dropout, which is the identity in eval mode and random in
training mode (then there is no fixed function to bound)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..certify.linear_chains import LinearMap, identity
from .context import NodeContext, Step, Unbounded
from .fuzzing import FuzzCase, apply, randn, unary
from .table import OpEntry, table

_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout)


def _identity_map(module: nn.Module, name: str, in_shape: torch.Size) -> Optional[LinearMap]:
    if module.training or len(in_shape) < 2:
        return None
    return identity(int(in_shape[1]), len(in_shape) - 2)


def _dropout_rule(ctx: NodeContext) -> Step:
    if ctx.module is not None:
        if ctx.module.training:
            raise Unbounded(f"{ctx.label}: dropout in training mode is random; certify in eval mode")
    elif ctx.arg(2, "train" if ctx.node.target is torch.dropout else "training", True):
        raise Unbounded(f"{ctx.label}: dropout traced in training mode is random; trace in eval mode")
    return Step.affine(1.0, "dropout (eval): identity")


def _dropout_cases(key, g: torch.Generator) -> list[FuzzCase]:
    shape = {nn.Dropout1d: (2, 3, 4), F.dropout1d: (2, 3, 4), nn.Dropout3d: (2, 3, 4, 4, 3),
             F.dropout3d: (2, 3, 4, 4, 3)}.get(key, (2, 3, 4, 4))
    if isinstance(key, type):
        return [FuzzCase(apply(key, 0.3).eval(), (randn(shape, g),), "eval")]
    return [FuzzCase(apply(key, 0.3, False), (randn(shape, g),), "training=False")]


ENTRIES = (
    OpEntry((nn.Identity,), lambda ctx: Step.affine(1.0, "identity"), unary(), linear_map=_identity_map,
            size_free=True, doc="1"),
    OpEntry(_MODULES + _FUNCTIONS, _dropout_rule, _dropout_cases, linear_map=_identity_map,
            size_free=True, doc="eval: 1; training: unbounded"),
)
for _entry in ENTRIES:
    table().add(_entry)
