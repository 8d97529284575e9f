"""Bound linear subgraphs as one operator (docs/math.md, sections 3 and 8).

A depthwise conv followed by its pointwise partner, a conv followed by an eval BatchNorm, a
stack of linears with nothing between them, or a residual ``x + conv(x)`` are each a single
linear map; bounding that map directly is much tighter than multiplying (or adding) the parts'
bounds. Every such map here is represented as one zero-padded convolution
(:class:`LinearMap`), with 0 spatial dims for matrices acting on 2-D ``(N, F)`` inputs.

Only compositions that are *exactly* a convolution are formed: at most one factor of a chain may
have spatial extent (kernel > 1, stride or padding); the others are channel maps (1x1 convs,
per-channel scales). Two spatial convs in a row are not one conv at the boundary of a
zero-padded input, so such chains are split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from ..norms.conv import conv_bound, matrix_norm
from ..norms.geometry import ConvGeometry
from ..ops.table import lookup


@dataclass(frozen=True)
class LinearMap:
    """x -> conv(x) with zero padding: weight (Cout, Cin/groups, *k) in float64, no dilation."""

    weight: torch.Tensor
    groups: int
    stride: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    layers: tuple[str, ...]  # names of the modules composed into it, in order
    pieces: int  # how many factors or summands went into it

    @property
    def ndim(self) -> int:
        return self.weight.dim() - 2

    @property
    def is_channel_map(self) -> bool:
        return all(k == 1 for k in self.weight.shape[2:]) and all(s == 1 for s in self.stride) and all(
            p == (0, 0) for p in self.pads
        )

    @property
    def geometry(self) -> ConvGeometry:
        return ConvGeometry(self.weight, self.groups, self.stride, (1,) * self.ndim, self.pads, "zeros")

    @property
    def out_channels(self) -> int:
        return self.geometry.out_channels

    @property
    def in_channels(self) -> int:
        return self.geometry.in_channels

    def dense(self) -> torch.Tensor:
        """The (Cout, Cin, *k) kernel with the group structure written out."""
        if self.groups == 1:
            return self.weight
        g, cout, cin_g = self.groups, self.out_channels, self.weight.shape[1]
        out = self.weight.new_zeros((cout, cin_g * g) + tuple(self.weight.shape[2:]))
        for j in range(g):
            out[j * (cout // g):(j + 1) * (cout // g), j * cin_g:(j + 1) * cin_g] = self.weight[j * (cout // g):(j + 1) * (cout // g)]
        return out

    def bound(self, in_shape: tuple[int, ...], label: str) -> float:
        """Sound bound on the map's norm at input shape (C, *spatial), without the batch dim."""
        if self.ndim == 0:
            return matrix_norm(self.dense())
        return conv_bound(self.geometry, tuple(in_shape[1:]), label)


def _regroup(weight: torch.Tensor, candidates: tuple[int, ...], **kw) -> LinearMap:
    """Store a dense kernel with the most groups its block-diagonal structure allows."""
    cout, cin = weight.shape[:2]
    for g in sorted(set(candidates), reverse=True):
        if g <= 1 or cout % g or cin % g:
            continue
        co, ci = cout // g, cin // g
        blocks = weight.reshape(g, co, g, ci, *weight.shape[2:])
        mask = ~torch.eye(g, dtype=torch.bool).reshape(g, 1, g, 1, *([1] * (weight.dim() - 2)))
        if not (blocks * mask).any():
            diag = torch.stack([blocks[j, :, j] for j in range(g)])  # (g, co, ci, *k)
            return LinearMap(diag.reshape(cout, ci, *weight.shape[2:]), g, **kw)
    return LinearMap(weight, 1, **kw)


def compose(outer: LinearMap, inner: LinearMap) -> Optional[LinearMap]:
    """outer o inner as one LinearMap, or None when that is not exactly a convolution."""
    if outer.ndim != inner.ndim or outer.in_channels != inner.out_channels:
        return None
    if not (outer.is_channel_map or inner.is_channel_map):
        return None
    spatial = inner if outer.is_channel_map else outer
    kw = dict(stride=spatial.stride, pads=spatial.pads, layers=inner.layers + outer.layers,
              pieces=inner.pieces + outer.pieces)
    if outer.is_channel_map and outer.weight.shape[1] == 1 and outer.groups == outer.out_channels:
        # a per-channel scale after anything keeps the inner group structure
        scale = outer.weight.reshape(-1, *([1] * (inner.weight.dim() - 1)))
        return LinearMap(inner.weight * scale, inner.groups, **kw)
    if outer.is_channel_map:
        # (Cout, Cmid) after a grouped inner map: contract group by group, never densify it
        g, cmid_g = inner.groups, inner.weight.shape[0] // inner.groups
        a = outer.dense().flatten(1).reshape(-1, g, cmid_g)
        blocks = inner.weight.reshape(g, cmid_g, *inner.weight.shape[1:])
        w = torch.einsum("ogm,gmi...->ogi...", a, blocks).flatten(1, 2)
    else:
        g, cmid_g = outer.groups, outer.weight.shape[1]
        blocks = outer.weight.reshape(g, -1, *outer.weight.shape[1:])  # (g, Cout/g, Cmid/g, *k)
        b = inner.dense().flatten(1).reshape(g, cmid_g, -1)
        w = torch.einsum("gom...,gmi->goi...", blocks, b).flatten(0, 1)
    return _regroup(w, (outer.groups, inner.groups), **kw)


def add(a: LinearMap, b: LinearMap, sign: float, in_size: tuple[int, ...], out_size: tuple[int, ...]) -> Optional[LinearMap]:
    """a + sign * b as one conv; both read the same input and produce outputs of the same size.

    Output o of a map reads inputs o*s - lo + t, t < k: align the kernels on the larger low pad.
    """
    if a.ndim != b.ndim or a.stride != b.stride or a.weight.shape[0] != b.weight.shape[0] or a.in_channels != b.in_channels:
        return None
    lo = tuple(max(pa[0], pb[0]) for pa, pb in zip(a.pads, b.pads))
    extent = tuple(
        max(l - pa[0] + ka, l - pb[0] + kb)
        for l, pa, pb, ka, kb in zip(lo, a.pads, b.pads, a.weight.shape[2:], b.weight.shape[2:])
    )
    # a high pad large enough for every output row; extra rows would only add to the norm
    hi = tuple(max(0, (o - 1) * s + e - n - l) for o, s, e, n, l in zip(out_size, a.stride, extent, in_size, lo))
    dense = torch.zeros((a.out_channels, a.in_channels) + extent, dtype=torch.float64)
    for m, f in ((a, 1.0), (b, sign)):
        index = (slice(None), slice(None)) + tuple(
            slice(l - p[0], l - p[0] + k) for l, p, k in zip(lo, m.pads, m.weight.shape[2:])
        )
        dense[index] += f * m.dense()
    return _regroup(dense, (a.groups, b.groups), stride=a.stride, pads=tuple(zip(lo, hi)),
                    layers=a.layers + b.layers, pieces=max(2, a.pieces + b.pieces))


def identity(channels: int, ndim: int) -> LinearMap:
    """The identity as a per-channel scale; it counts as no piece of a composition."""
    return diagonal(torch.ones(channels), ndim, None)


def diagonal(scale: torch.Tensor, ndim: int, name: Optional[str]) -> LinearMap:
    """x -> scale * x per channel (dim 1), as a grouped 1x1 conv; ``name`` the module it comes from."""
    w = scale.detach().double().reshape((-1, 1) + (1,) * ndim)
    layers = (name,) if name is not None else ()
    return LinearMap(w, w.shape[0], (1,) * ndim, ((0, 0),) * ndim, layers, len(layers))


def sole_user(node: fx.Node) -> bool:
    return len(node.users) == 1


@dataclass
class Form:
    """A linear map from ``source`` to a node; ``homogeneous``: it scales with its layers' scales."""

    source: fx.Node
    map: LinearMap
    homogeneous: bool


def linear_forms(modules: dict, order: list[fx.Node], shapes: dict, dependent: set,
                 skip: set = frozenset()) -> dict[fx.Node, Form]:
    """The composed linear map ending at each node (only maximal ones are kept); no map ends at
    or runs through a node in ``skip`` (nodes without a bound)."""
    forms: dict[fx.Node, Form] = {}
    absorbed: set[fx.Node] = set()

    def base(u: fx.Node) -> Optional[Form]:
        return forms.get(u) if u in forms and sole_user(u) else None

    for n in order:
        if n not in dependent or n in skip or not n.args or not isinstance(shapes.get(n), torch.Size):
            continue
        if n.op == "call_module":
            u = n.args[0]
            if not isinstance(u, fx.Node) or len(n.args) != 1 or n.kwargs or not isinstance(shapes.get(u), torch.Size):
                continue
            entry = lookup(type(modules[n.target]))
            m = entry.linear_map(modules[n.target], n.target, shapes[u]) if entry and entry.linear_map else None
            if m is None:
                continue
            b = base(u)
            c = compose(m, b.map) if b is not None else None
            if c is not None:
                forms[n] = Form(b.source, c, b.homogeneous)
                absorbed.add(u)
            else:
                forms[n] = Form(u, m, True)
        elif n.op == "call_function" and _sum_sign(n.target) is not None and len(n.args) == 2 and not n.kwargs:
            a, b_ = n.args
            if not all(isinstance(x, fx.Node) and x in dependent and shapes.get(x) == shapes[n] for x in (a, b_)):
                continue
            parts = []
            for x in (a, b_):
                f = base(x)
                if f is None:
                    if len(shapes[x]) < 2:
                        break
                    f = Form(x, identity(int(shapes[x][1]), len(shapes[x]) - 2), True)
                parts.append(f)
            if len(parts) != 2 or parts[0].source is not parts[1].source:
                continue
            src = parts[0].source
            summed = add(parts[0].map, parts[1].map, _sum_sign(n.target), tuple(shapes[src][2:]), tuple(shapes[n][2:]))
            if summed is not None:
                forms[n] = Form(src, summed, False)
                absorbed.update(x for x in (a, b_) if x in forms)
    return {n: f for n, f in forms.items() if n not in absorbed and f.map.pieces >= 2}




def _sum_sign(target: object) -> Optional[float]:
    entry = lookup(target)
    return entry.sum_sign if entry is not None else None
