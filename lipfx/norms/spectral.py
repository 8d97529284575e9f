"""Per-frequency analysis of convolutions on a circulant domain (docs/math.md, sections 1-3).

Every bound here follows one argument: the layer's operator is a *restriction* of a circulant
operator on some grid (rows dropped, zero-padded input embedded), so its norm is at most the
circulant's norm, which the DFT block-diagonalises into one small matrix per frequency.

Strided convs use the polyphase decomposition: with stride s, input x splits into s^d phases
x_q = x[q::s] and the kernel into w_q = w[q::s]; the stride-s conv on a grid of size M is a
unit-stride conv on the grid M/s whose input channels are (channel, phase) pairs. So a strided
conv is handled as a unit-stride conv with Cin * s^d input channels -- the "phase-stacked kernel".
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

# Relative slack on every float64 result: far above float64 round-off for any layer size met in
# practice (see _rounding_slack for the absolute term that covers Gram-matrix round-off).
RELATIVE_SLACK = 1e-9
_U64 = 2.0**-53
_SMALL_GRAM = 32  # up to this Gram size batched eigvalsh is cheap; above it LAPACK slows sharply
_FREQ_CHUNK_BYTES = 256 * 2**20


def phase_stack(weight: torch.Tensor, groups: int, stride: Sequence[int]) -> torch.Tensor:
    """(Cout, Cin_g, *ke) dilated kernel -> (groups, Cout_g, Cin_g * s^d, *ceil(ke/s)).

    Phase q of the kernel is w[..., q::s]; stacking phases as extra input channels turns the
    stride-s convolution into a unit-stride one on the subsampled grid.
    """
    cout, cin_g = weight.shape[:2]
    ke = weight.shape[2:]
    if all(s == 1 for s in stride):  # one phase: a view, no copies (training calls this every step)
        return weight.reshape(groups, cout // groups, cin_g, *ke)
    kq = [math.ceil(k / s) for k, s in zip(ke, stride)]
    phases = []
    for q in itertools.product(*(range(s) for s in stride)):
        wq = weight[(slice(None), slice(None)) + tuple(slice(qi, None, s) for qi, s in zip(q, stride))]
        pad = []
        for size, target in zip(reversed(wq.shape[2:]), reversed(kq)):
            pad += [0, target - size]
        phases.append(torch.nn.functional.pad(wq, pad))
    stacked = torch.stack(phases, dim=2)  # (Cout, Cin_g, P, *kq)
    stacked = stacked.reshape(cout, cin_g * len(phases), *kq)
    return stacked.reshape(groups, cout // groups, cin_g * len(phases), *kq)


def fold_kernel(kernel: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Wrap taps modulo the grid (a circulant of size n sees tap t and t + n as the same)."""
    d = len(grid)
    out = kernel
    for axis, n in zip(range(kernel.dim() - d, kernel.dim()), grid):
        k = out.shape[axis]
        if k <= n:
            pad = [0, 0] * (kernel.dim() - 1 - axis) + [0, n - k]
            out = torch.nn.functional.pad(out, pad)
            continue
        reps = math.ceil(k / n)
        pad = [0, 0] * (kernel.dim() - 1 - axis) + [0, reps * n - k]
        out = torch.nn.functional.pad(out, pad)
        shape = list(out.shape)
        shape[axis : axis + 1] = [reps, n]
        out = out.reshape(shape).sum(axis)
    return out


def transfer_matrices(stacked: torch.Tensor, grid: Sequence[int], half: bool = True) -> torch.Tensor:
    """Per-frequency blocks of the circulant: (groups, *freqs, Cout_g, Cin_g*P), complex.

    ``half`` keeps one of each conjugate pair f, -f (real kernels: equal singular values).
    """
    d = len(grid)
    folded = fold_kernel(stacked, grid)
    dims = tuple(range(3, 3 + d))
    spec = torch.fft.rfftn(folded, dim=dims) if half else torch.fft.fftn(folded, dim=dims)
    return spec.permute(0, *dims, 1, 2)


def half_spectrum(grid: Sequence[int]) -> torch.Tensor:
    """Integer frequencies, one of each pair {f, -f mod n}: shape (F, d)."""
    axes = [torch.arange(n) for n in grid[:-1]] + [torch.arange(grid[-1] // 2 + 1)]
    return torch.cartesian_prod(*axes).reshape(-1, len(grid))


def _autocorrelation(stacked: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """R[delta] = sum_t M_{t+delta} M_t^T for the per-tap matrices M_t of the kernel.

    The DFT of R over delta is the per-frequency Gram matrix A(f) A(f)^H (side='out') or
    A(f)^T conj(A(f)) (side='in'; same eigenvalues as A^H A). Returns (offsets (D, d), R (D, g, a, a)).
    """
    g, co, ci = stacked.shape[:3]
    kq = stacked.shape[3:]
    taps = stacked.reshape(g, co, ci, -1).permute(3, 0, 1, 2)  # (T, g, co, ci)
    if side == "in":
        taps = taps.transpose(-1, -2)
    positions = list(itertools.product(*(range(k) for k in kq)))
    index = {p: i for i, p in enumerate(positions)}
    offsets, blocks, done = [], [], {}
    for delta in itertools.product(*(range(-(k - 1), k) for k in kq)):
        mirror = done.get(tuple(-dl for dl in delta))
        if mirror is not None:  # R[-delta] = R[delta]^T: half the matmuls
            blocks.append(mirror.transpose(-1, -2))
            offsets.append(delta)
            continue
        pairs = [
            (index[tuple(t + dl for t, dl in zip(tp, delta))], index[tp])
            for tp in positions
            if all(0 <= t + dl < k for t, dl, k in zip(tp, delta, kq))
        ]
        left = taps[[i for i, _ in pairs]]  # (p, g, a, b)
        right = taps[[j for _, j in pairs]]
        # sum_p left_p @ right_p^T as one matmul over the concatenated inner dimension
        left = left.permute(1, 2, 0, 3).reshape(g, left.shape[2], -1)
        right = right.permute(1, 2, 0, 3).reshape(g, right.shape[2], -1)
        done[delta] = left @ right.transpose(-1, -2)
        blocks.append(done[delta])
        offsets.append(delta)
    return torch.tensor(offsets, dtype=torch.float64), torch.stack(blocks)


def _rounding_slack(stacked: torch.Tensor, gram_size: int, n_offsets: int) -> float:
    """Absolute bound (on sigma^2) for float64 round-off in forming and certifying Gram matrices.

    Standard gamma_n bounds: each Gram entry is a sum of (taps * inner) products plus an
    n_offsets-term DFT, and Cholesky/eigvalsh add a backward error of order a^2 u ||G||.
    Everything is bounded by ||W||_F^2 (per group), which dominates every |G| entry sum.
    """
    taps = math.prod(stacked.shape[3:])
    inner = max(stacked.shape[1], stacked.shape[2])
    frob2 = float(stacked.double().pow(2).sum(dim=tuple(range(1, stacked.dim()))).max())
    return 8 * _U64 * (taps * inner + n_offsets + (gram_size + 1) ** 2) * frob2


def max_transfer_norm(stacked: torch.Tensor, grid: Sequence[int]) -> float:
    """Sound upper bound on max over groups and frequencies of ||A_g(f)||_2 on ``grid``.

    Small blocks: exact (vector norms or eigvalsh of the Gram matrix). Large blocks: Gram
    matrices formed from the kernel's autocorrelation (one real matmul per offset instead of a
    complex matmul per frequency), a power-iteration *lower* estimate per frequency, then one batched
    Cholesky of (tau I - G) certifies lambda_max(G) <= tau for every frequency at once; only
    frequencies that fail get an exact eigvalsh. Cholesky succeeding is a proof, not an estimate.
    """
    stacked = stacked.detach().to(torch.float64)
    g, co, ci = stacked.shape[:3]
    if min(co, ci) == 1:
        # Each block is a row or a column: its norm is the Euclidean norm over the long side.
        spec = transfer_matrices(stacked, grid)
        sq = spec.real.square() + spec.imag.square()
        best = float(sq.sum(dim=(-1, -2)).max())
        return math.sqrt(best) * (1 + RELATIVE_SLACK)

    side = "out" if co <= ci else "in"
    a = min(co, ci)
    offsets, corr = _autocorrelation(stacked, side)  # (D, d), (D, g, a, a)
    freqs = half_spectrum(grid).to(torch.float64)
    scale = torch.tensor([2 * math.pi / n for n in grid], dtype=torch.float64)
    chunk = max(1, _FREQ_CHUNK_BYTES // (16 * g * a * a))
    slack = _rounding_slack(stacked, a, offsets.shape[0])

    def grams(index: torch.Tensor) -> torch.Tensor:
        # G(f) = sum_delta R[delta] exp(-i f.delta), as an explicit (F x D) DFT: aliasing of
        # offsets beyond the grid is then handled exactly.
        phase = (freqs[index] * scale) @ offsets.T
        e = torch.polar(torch.ones_like(phase), -phase)
        return torch.einsum("fd,dgab->fgab", e, corr.to(torch.complex128))

    chunks = torch.arange(len(freqs)).split(chunk)
    if a <= _SMALL_GRAM:
        best = max(float(torch.linalg.eigvalsh(grams(c))[..., -1].max()) for c in chunks)
        return math.sqrt(best + slack) * (1 + RELATIVE_SLACK)

    # Lower estimates: a few power steps everywhere, then many on the leading frequencies only.
    rough = torch.cat([_power_lower(grams(c), iters=6).reshape(len(c), g).amax(1) for c in chunks])
    top = torch.nonzero(rough >= 0.9 * rough.max()).flatten()
    top = top[rough[top].argsort(descending=True)][:16]
    tau = float(_power_lower(grams(top), iters=60).max()) * (1 + 1e-3)
    # Certify lambda_max(G(f)) <= tau at every frequency with one batched Cholesky of tau I - G.
    # Where it fails, tau was below the true maximum there: refine the estimate on those
    # frequencies only and certify them again; exact eigenvalues only as a last resort. The
    # slack is added after the proof, not to the level it proves: it must cover the Cholesky's
    # own rounding and the computed G's distance to the exact one whatever the estimate was.
    eye = torch.eye(a, dtype=torch.complex128)
    pending = torch.cat([c[_fails(grams(c), tau, eye)] for c in chunks])
    for iters in (200, 1000):
        if len(pending) == 0:
            break
        tau = max(tau, float(_power_lower(grams(pending), iters=iters).max()) * (1 + 1e-3))
        pending = pending[_fails(grams(pending), tau, eye)]
    best = tau
    for c in pending.split(chunk) if len(pending) else ():
        best = max(best, float(torch.linalg.eigvalsh(grams(c))[..., -1].max()))
    return math.sqrt(best + slack) * (1 + RELATIVE_SLACK)


_EIGVALSH_MAX_GRAM = 1024  # up to this Gram side a full eigvalsh estimate beats LOBPCG here


def certified_matrix_norm(matrix: torch.Tensor) -> float:
    """Sound upper bound on ||M||_2 of a 2-D matrix, up to 10x faster than an SVD (512 x 4608).

    lambda_max of the smaller Gram matrix is estimated (eigvalsh up to side 1024, LOBPCG from
    below beyond), then tau >= lambda_max is *proved* by a Cholesky factorisation of tau I - G,
    and the float64 round-off of forming G and of the Cholesky is added to the proved tau: the
    estimate only has to be close, never right. Exact eigvalsh if the proof fails three times.
    """
    m = matrix.detach().to(torch.float64)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    slack = _rounding_slack(m.unsqueeze(0), gram.shape[0], 1)
    estimate = _largest_eigenvalue_estimate(gram)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    for margin in (1e-8, 1e-5, 1e-2):
        tau = estimate * (1 + margin)
        if math.isfinite(tau) and not bool(_fails(gram.unsqueeze(0), tau, eye)[0]):
            return math.sqrt(tau + slack) * (1 + RELATIVE_SLACK)
    return math.sqrt(float(torch.linalg.eigvalsh(gram)[-1]) + slack) * (1 + RELATIVE_SLACK)


def _largest_eigenvalue_estimate(gram: torch.Tensor) -> float:
    """lambda_max of a symmetric PSD matrix, approximately (an input to a proof, not a bound).
    LOBPCG runs on G scaled by a power of two near its largest diagonal entry: unscaled, Grams
    of entries near 2^299 (inside the range ``scale_invariant`` leaves alone) made it fail to
    converge or return 0; if it still fails, eigvalsh."""
    if gram.shape[0] <= _EIGVALSH_MAX_GRAM:
        return float(torch.linalg.eigvalsh(gram)[-1])
    top = float(gram.diagonal().max())
    if not top > 0 or not math.isfinite(top):
        return float(torch.linalg.eigvalsh(gram)[-1])
    scale = 2.0 ** math.floor(math.log2(top))
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(gram.shape[0], 1, dtype=torch.float64, generator=gen)
    try:
        return float(torch.lobpcg(gram / scale, X=start, largest=True, niter=200, tol=1e-13)[0][0]) * scale
    except RuntimeError:  # torch's LinAlgError included
        return float(torch.linalg.eigvalsh(gram)[-1])


def _fails(gram: torch.Tensor, tau: float, eye: torch.Tensor) -> torch.Tensor:
    """Frequencies (rows of a (F, g, a, a) batch) where Cholesky cannot prove lambda_max <= tau."""
    _, info = torch.linalg.cholesky_ex(tau * eye - gram)
    return (info != 0).reshape(gram.shape[0], -1).any(1)


def _power_lower(gram: torch.Tensor, iters: int) -> torch.Tensor:
    """Rayleigh-quotient lower estimates of lambda_max for a batch of Hermitian PSD matrices."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(gram.shape[:-1], dtype=torch.float64, generator=gen).to(gram.dtype)
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    for _ in range(iters):
        w = (gram @ v.unsqueeze(-1)).squeeze(-1)
        v = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(1e-300)
    rq = (v.conj().unsqueeze(-2) @ gram @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1).real
    return rq.reshape(-1)


def circulant_singular_values(stacked: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """All singular values of the circulant operator (exact per-frequency SVD, full spectrum)."""
    spec = transfer_matrices(stacked.detach().to(torch.float64), grid, half=False)
    return torch.linalg.svdvals(spec).reshape(-1).sort(descending=True).values
