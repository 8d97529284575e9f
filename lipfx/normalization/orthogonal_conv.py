"""Gradient-norm-preserving spatial convs kept whole: ``constraint="aol"`` and ``"orthogonal"``
for convs with a spatial kernel (docs/math.md, section 16).

- :class:`AOLConvNormalization`: ``W -> K * W D``, D one scale per input (or output) channel from
  the absolute row sums of the conv's Gram kernel (AOL for convolutions, Prach & Lampert 2022).
  Schur's test bounds the conv by 1 on the whole grid, for every kernel.
- :class:`OrthogonalConvNormalization`: a block-convolution orthogonal parametrization (BCOP,
  Li et al. 2019). The kernel is a product of 2-tap blocks ``[P, I - P]`` along each spatial dim
  (P an orthogonal projector), composed with a (semi-)orthogonal channel matrix H. Each block's
  symbol ``P + (I - P) e^{iw}`` is unitary at every frequency, so on the whole grid, and on any
  torus, the conv is an isometry (more output channels) or a co-isometry (fewer). Every matrix
  comes from the Cayley map of :mod:`.orthogonal`, so this holds for every value of the
  parameters. The k x k kernel keeps the layer an ordinary conv: the graph does not change. A
  strided conv gets the blocks then an orthogonal map of each stride-sized patch
  (:func:`strided_kernel`), so that the strided conv itself, not only the conv it subsamples, is
  an isometry or co-isometry.

Both claim norm <= 1 in training mode, which holds for zero padding with any stride and dilation
(the layer is a crop of the whole-grid conv, subsampled) and for circular padding that wraps at
most once; :func:`gnp_conv_reason` refuses the rest, which stay spectrally normalized. (In float32
each block adds rounding: measured up to 1 + 2e-6 for 32 blocks, 1 + 1e-6 for 3x3 kernels; on
CUDA the maps run in float64, :func:`.base.exact_map_dtype`, since TF32 would add ~4e-4.) Eval
mode divides by the certified FFT bound of the mapped kernel where it exceeds 1 (round-off), and
by nothing otherwise: the eval network is the trained one, every layer's norm <= K.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArgumentError
from ..norms.geometry import ConvGeometry, conv_geometry
from .base import LipschitzNormalization, _autocast_off, compute_dtype, exact_map_dtype
from .layers import SpatialConvFrame
from .orthogonal import completed_polar, keep_wide, stiefel
from .rescale import TrainBound

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def gnp_conv_reason(geom: ConvGeometry) -> Optional[str]:
    """Why a spatial conv cannot take an AOL or orthogonal kernel (None: it can)."""
    if geom.groups > 1 and geom.weight.shape[1] == 1:
        # the separable rewrite's spatial half: its exact FFT bound is tight at every step, and
        # spatial="shift" is the norm-preserving choice for it
        return "depthwise: bounded exactly by FFT (spatial='shift' makes it norm-preserving)"
    if geom.padding_mode == "zeros" or all(lo == hi == 0 for lo, hi in geom.pads):
        return None
    if geom.padding_mode == "circular" and all(lo + hi <= e - 1 for (lo, hi), e in zip(geom.pads, geom.effective_kernel)):
        return None
    return f"{geom.padding_mode} padding repeats input pixels, so a norm-1 kernel does not give a norm-1 layer"


def gram_row_sums(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``sum_{j, offset} |G_ij(offset)|`` per group and input channel i, (groups, Cin/groups):
    G is the conv's Gram kernel, ``G_ij(d) = sum_{o, t} W_oi(t) W_oj(t + d)``, whose conv is
    the whole-grid ``T^T T``. One conv of the kernel with itself."""
    cout, cin_g = weight.shape[:2]
    taps = weight.shape[2:]
    cout_g = cout // groups
    # cin_g "images" of cout channels, filtered by the kernel with its in/out roles swapped
    images = weight.transpose(0, 1)
    filters = weight.reshape(groups, cout_g, cin_g, *taps).transpose(1, 2).reshape(groups * cin_g, cout_g, *taps)
    gram = _CONV[len(taps)](images, filters, padding=tuple(k - 1 for k in taps), groups=groups)
    return gram.abs().sum(dim=(0,) + tuple(range(2, gram.dim()))).reshape(groups, cin_g)


def aol_conv(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The AOL-rescaled kernel, norm <= 1 on the whole grid (docs/math.md, 16.1): input channels
    scaled by ``(Gram row sum)^(-1/2)`` when Cout/groups >= Cin/groups, else output channels by
    those of the transposed conv (the smaller Gram kernel, as for matrices)."""
    cout, cin_g = weight.shape[:2]
    cout_g, taps = cout // groups, weight.shape[2:]
    per_group = weight.reshape(groups, cout_g, cin_g, *taps)
    tiny = torch.finfo(weight.dtype).tiny
    ones = (1,) * len(taps)
    if cout_g >= cin_g:
        d = gram_row_sums(weight, groups).clamp_min(tiny).rsqrt()
        return (per_group * d.reshape(groups, 1, cin_g, *ones)).reshape(weight.shape)
    swapped = per_group.transpose(1, 2).reshape(groups * cin_g, cout_g, *taps)  # the transposed conv's kernel (unflipped)
    d = gram_row_sums(swapped, groups).clamp_min(tiny).rsqrt()
    return (per_group * d.reshape(groups, cout_g, 1, *ones)).reshape(weight.shape)


def block_kernel(projectors: torch.Tensor, kernel_size: Sequence[int], left: Optional[torch.Tensor] = None,
                 right: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernel (groups, o, i, *kernel_size) of the conv ``left B_1 o B_2 o ... right`` with one
    2-tap block ``[P_j, I - P_j]`` per entry of ``projectors`` (groups, m, c, c), m = sum(k - 1),
    the first k_1 - 1 along spatial dim 1, and so on; ``left`` (groups, o, c) and ``right``
    (groups, c, i) are matrices (identity when None). Kernels compose by a matrix-valued full
    convolution, ``(A o B)[v] = sum_{s + u = v} A[s] B[u]``: blocks along one dim give a 1-D
    kernel (:func:`_line`), and 1-D kernels along different dims compose by a product per tap
    pair, ``U[t_1, t_2, ...] = A_1[t_1] A_2[t_2] ...``. The matrices multiply the first and last
    dims' taps, so the c x c kernel is never formed for a thin H."""
    g, m, c, _ = projectors.shape
    if m != sum(k - 1 for k in kernel_size):
        raise ValueError(f"{m} projectors for kernel {tuple(kernel_size)}")
    lines = _lines(projectors, kernel_size)  # (g, k_d, c, c) per dim with k_d > 1
    if not lines:
        eye = torch.eye(c, dtype=projectors.dtype, device=projectors.device)
        lines = [eye.expand(g, 1, c, c)]
    if left is not None:
        lines[0] = left.unsqueeze(1) @ lines[0]
    if right is not None:
        lines[-1] = lines[-1] @ right.unsqueeze(1)
    u = lines[0]
    for d, line in enumerate(lines[1:], 1):  # (g, k_1, ..., k_d, o, c) @ (g, 1, ..., 1, k_{d+1}, c, i)
        u = u.unsqueeze(-3) @ line.reshape(g, *(1,) * d, *line.shape[1:])
    taps = u.dim() - 3
    u = u.permute(0, taps + 1, taps + 2, *range(1, taps + 1))
    return u.reshape(*u.shape[:3], *kernel_size)


def _lines(projectors: torch.Tensor, kernel_size: Sequence[int]) -> list[torch.Tensor]:
    """Each dim's 1-D block kernel (g, k, c, c), for the dims with k > 1 (dims of one size are
    computed together)."""
    g, _, c, _ = projectors.shape
    spans = [(j, k) for j, k in zip(itertools.accumulate((k - 1 for k in kernel_size), initial=0), kernel_size) if k > 1]
    if not spans:
        return []
    if len({k for _, k in spans}) == 1:  # one batch over dims: the projectors are laid out dim by dim
        k = spans[0][1]
        both = _line(projectors.reshape(g, len(spans), k - 1, c, c))
        return list(both.unbind(1))
    return [_line(projectors[:, j:j + k - 1]) for j, k in spans]


def _line(p: torch.Tensor) -> torch.Tensor:
    """The 1-D kernel (..., n + 1, c, c) of the blocks ``[P_1, I - P_1] o ... o [P_n, I - P_n]``
    for projectors p (..., n, c, c): one batched product per block after the first."""
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    first = p[..., 0, :, :]
    taps = torch.stack((first, eye - first), -3)
    for j in range(1, p.shape[-3]):
        # (taps o [P, I - P])[v] = taps[v] P + taps[v - 1] (I - P), and taps (I - P) = taps - taps P
        tp = taps @ p[..., j:j + 1, :, :]
        taps = F.pad(tp, (0, 0, 0, 0, 0, 1)) + F.pad(taps - tp, (0, 0, 0, 0, 1, 0))
    return taps


def _patch(geom: ConvGeometry) -> Optional[tuple[int, ...]]:
    """The stride, where a strided conv takes the patch construction (:func:`strided_kernel`):
    undilated, every kernel dim at least its stride, and zero padding (or none), under which the
    layer is a crop of the whole-grid strided conv. None: the kernel is built as for stride 1
    and the stride subsamples it (still norm <= 1, but no longer norm-preserving)."""
    if all(s == 1 for s in geom.stride) or any(d != 1 for d in geom.dilation):
        return None
    if any(k < s for k, s in zip(geom.kernel_size, geom.stride)):
        return None
    if geom.padding_mode != "zeros" and any(lo or hi for lo, hi in geom.pads):
        return None
    return geom.stride


def strided_kernel(r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The kernel (groups, Cout/g, c, *(k' + s - 1)) of ``R o U`` for a conv with stride s: U
    (groups, c, c, *k') a stride-1 kernel (the BCOP blocks), R (groups, Cout/g, c, *s) a kernel
    of one stride-sized patch. With stride s, R reads U's output on disjoint patches, so where
    R's matrix (Cout/g, c * prod(s)) is (semi-)orthogonal, the whole-grid strided conv is a
    co-isometry (or an isometry) like U (AOC, Boissin et al. 2025).

    ``(R o U)[v] = sum_{t + w = v} R[t] U[w]`` is the transposed conv of R (an "image" per output
    channel, c channels, side s) with U's taps: one call, groups as conv groups."""
    g, o, c = r.shape[:3]
    nd = r.dim() - 3
    image = r.transpose(0, 1).reshape(o, g * c, *r.shape[3:])
    w = _CONV_T[nd](image, u.reshape(g * c, u.shape[2], *u.shape[3:]), groups=g)  # (o, g * i, *k)
    return w.reshape(o, g, u.shape[2], *w.shape[2:]).transpose(0, 1)


def _delta_start(groups: int, c: int, kernel_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Projector bases (groups, m, c, c) and ranks (m,) such that each dim's blocks come in
    complementary pairs: ``(P + (I - P) z)((I - P) + P z) = z``, so the parameters at 0 give the
    kernel H at its centre tap (a delta-orthogonal start, Xiao et al. 2018); an odd block out is
    a random rank-c/2 projector."""
    gen = torch.Generator().manual_seed(0)
    bases, ranks = [], []
    for k in kernel_size:
        for j in range(k - 1):
            if j % 2 == 1:  # the complement of the block before: its other columns first
                bases.append(bases[-1].roll(-ranks[-1], dims=-1))
                ranks.append(c - ranks[-1])
                continue
            q, _ = torch.linalg.qr(torch.randn(groups, c, c, generator=gen, dtype=torch.float64))
            bases.append(q)
            ranks.append(c // 2)
    if not bases:
        return torch.zeros(groups, 0, c, c, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.stack(bases, 1), torch.tensor(ranks)


class _SpatialGNP(SpatialConvFrame, LipschitzNormalization):
    """A spatial conv whose mapped kernel has norm <= 1 by construction: training mode has
    nothing to bound (bound 1, no state, no host read); eval mode certifies it by FFT."""

    _wide = ()  # buffers kept at float32 or wider whatever the module is cast to
    bounded_by_construction = True

    def __init__(self, conv: nn.Module, sizes: Sequence[Sequence[int]], K: float, scaling: str = "hard",
                 s_init: float = 3.0, name: str = "") -> None:
        super().__init__(K, scaling, s_init, name)
        reason = gnp_conv_reason(conv_geometry(conv, name))
        if reason is not None:
            raise ArgumentError(f"'{name}' cannot take a gradient-norm-preserving kernel: {reason}")
        self._set_frame(conv, sizes, name)
        self.kind += "@" + self._sizes_label()

    def _map(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transform(self, weight: torch.Tensor) -> torch.Tensor:
        # never under autocast: eval mode bounds this map's output once and applies it later
        with _autocast_off(weight.device.type):
            return self._map(weight.to(exact_map_dtype(weight))).to(weight.dtype)

    def train_bound(self, weight: torch.Tensor, gradient: bool = True) -> TrainBound:
        return TrainBound(torch.ones((), dtype=compute_dtype(weight), device=weight.device), None)

    def _apply(self, fn, recurse=True):
        return keep_wide(self, self._wide, lambda: super(_SpatialGNP, self)._apply(fn, recurse))


class AOLConvNormalization(_SpatialGNP):
    """Spatial convs kept whole: ``W -> K * W D`` (AOL for convolutions, :func:`aol_conv`)."""

    kind = "aol-conv"

    def _map(self, weight: torch.Tensor) -> torch.Tensor:
        return aol_conv(weight, self.groups)


class OrthogonalConvNormalization(_SpatialGNP):
    """Spatial convs kept whole: ``W -> K * BCOP kernel``, an isometry or co-isometry on the whole
    grid (per group) for every value of the parameters.

    Parameters: H's Cayley parameter is the centre tap of ``weight`` (the other taps are unused
    and zeroed); ``projectors`` (groups, m, c, c), c = max(Cout, Cin) per group, m = sum(k - 1),
    parametrizes the blocks' projectors around the buffer ``projector_base``. At registration H's
    base becomes the completed polar factor of the kernel's tap sum (its response to a constant
    image) and every parameter 0: the layer starts as H at the centre tap (delta-orthogonal).

    A strided conv taking :func:`strided_kernel` (``patch`` is its stride) has R in H's place:
    R's parameter is the raw weight's first stride-many taps per dim, its base their completed
    polar factor, and the blocks (m = sum(k - s)) act on c = Cin/groups channels. Checkpoints of
    such a layer saved before this construction have other buffer shapes and fail to load.
    """

    kind = "orthogonal-conv(bcop)"
    _wide = ("base", "projector_base")

    def __init__(self, conv: nn.Module, sizes: Sequence[Sequence[int]], K: float, scaling: str = "hard",
                 s_init: float = 3.0, name: str = "") -> None:
        super().__init__(conv, sizes, K, scaling, s_init, name)
        weight = conv.weight
        cout, cin_g = weight.shape[:2]
        self.kernel_size = tuple(weight.shape[2:])
        self.patch = _patch(self._geometry(weight))  # the frame's geometry, set up by the base class
        cout_g = cout // self.groups
        dtype = compute_dtype(weight)
        taps = tuple(range(2, weight.dim()))
        if self.patch is None:
            c, blocks = max(cout_g, cin_g), self.kernel_size
            h = weight.detach().sum(taps).reshape(self.groups, cout_g, cin_g)
        else:  # blocks on the input channels, then R on each stride-sized patch
            c, blocks = cin_g, tuple(k - s + 1 for k, s in zip(self.kernel_size, self.patch))
            h = self._patch_param(weight.detach())
            self.kind = self.kind.replace("(bcop)", "(bcop, strided)")
        self.blocks = blocks
        self.register_buffer("base", completed_polar(h if h.shape[-2] >= h.shape[-1] else h.mT).to(dtype))
        bases, ranks = _delta_start(self.groups, c, blocks)
        self.register_buffer("projector_base", bases.to(device=weight.device, dtype=dtype))
        masks = (torch.arange(c)[None, :] < ranks[:, None]).to(device=weight.device, dtype=dtype)
        self.register_buffer("_masks", masks, persistent=False)
        self.projectors = nn.Parameter(weight.new_zeros(bases.shape))
        with torch.no_grad():
            weight.zero_()

    def transform_state(self) -> tuple:
        return (self.base, self.projector_base, self.projectors)

    def _patch_param(self, weight: torch.Tensor) -> torch.Tensor:
        """R's parameter (groups, Cout/groups, Cin/groups * prod(stride)): the kernel's first
        stride-many taps along each dim (the other taps are unused)."""
        corner = weight[(slice(None), slice(None)) + tuple(slice(0, s) for s in self.patch)]
        cout, cin_g = weight.shape[:2]
        return corner.reshape(self.groups, cout // self.groups, cin_g * corner[0, 0].numel())

    def _map(self, weight: torch.Tensor) -> torch.Tensor:
        cout, cin_g = weight.shape[:2]
        cout_g = cout // self.groups
        q = stiefel(self.projector_base, self.projectors.to(weight.dtype))
        p = (q * self._masks.to(q.dtype)[:, None, :]) @ q.mT  # orthogonal projectors of the masks' ranks
        if self.patch is not None:
            r = stiefel(self.base, self._patch_param(weight))
            u = block_kernel(p, self.blocks)
            return strided_kernel(r.reshape(self.groups, cout_g, cin_g, *self.patch), u).reshape(weight.shape)
        centre = weight[(slice(None), slice(None)) + tuple(k // 2 for k in self.kernel_size)]
        h = stiefel(self.base, centre.reshape(self.groups, cout_g, cin_g))
        # isometry: the blocks act on the output side, after H; co-isometry: on the input side
        w = block_kernel(p, self.blocks, right=h) if cout_g >= cin_g else block_kernel(p, self.blocks, left=h)
        return w.reshape(weight.shape)
