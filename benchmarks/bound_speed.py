"""Milliseconds per sound bound vs two peers, measured side by side in one run.

Layers: a MobileNetV2-sized depthwise conv (384 ch, 3x3, 14x14) and a 512x512x3x3 conv at 14x14.
Peers:
- power iteration on the full operator (conv and its adjoint by autograd), float32, run until the
  relative change is < 1e-6 (an estimate from below, not a bound);
- Gram iteration (Delattre et al., ICML 2023) on the per-frequency matrices of the same circulant
  embedding, 6 iterations (a sound upper bound).

Also VGG's 4096x25088 linear layer: lipfx's certified Gram + LOBPCG + Cholesky bound vs an
exact float64 SVD (``--linear-only`` runs just that row).

    python benchmarks/bound_speed.py [--repeat 3] [--linear-only]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from lipfx.norms import layer_bound, operator_norm


def gram_iteration(conv: nn.Conv2d, n: int, iters: int = 6) -> float:
    """Fourier-domain Gram iteration with Frobenius rescaling; ||A|| <= ||G_t||_F^(1/2^t)."""
    w = conv.weight.detach().double()
    g = conv.groups
    co, ci = w.shape[0] // g, w.shape[1]
    spec = torch.fft.rfft2(w, s=(n, n)).reshape(g, co, ci, -1).permute(0, 3, 1, 2)  # (g, F, co, ci)
    log_scale = torch.zeros(spec.shape[:2], dtype=torch.float64)
    mat = spec
    for _ in range(iters):
        fro = torch.linalg.matrix_norm(mat, "fro")
        mat = mat / fro[..., None, None]
        log_scale = 2 * (log_scale + torch.log(fro))
        mat = mat.mH @ mat
    log_bound = (log_scale + torch.log(torch.linalg.matrix_norm(mat, "fro"))) / 2**iters
    return float(torch.exp(log_bound).max())


def power_full(conv: nn.Conv2d, shape: tuple[int, ...]) -> float:
    conv32 = conv.float()
    return operator_norm(lambda x: conv32(x.unsqueeze(0)), shape, iters=2000, tol=1e-6, dtype=torch.float32)


def timed(fn, repeat: int) -> tuple[float, float]:
    best, value = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--linear-only", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'layer':<28} {'method':<22} {'ms':>9} {'value':>10} {'ms / lipfx':>10}")
    linear = nn.Linear(25088, 4096, bias=False)
    ms_lipfx, v_lipfx = timed(lambda: layer_bound(linear, (25088,)), 1)
    ms_svd, v_svd = timed(lambda: float(torch.linalg.matrix_norm(linear.weight.detach().double(), ord=2)), 1)
    print(f"{'linear 4096x25088':<28} {'lipfx (sound)':<22} {ms_lipfx:9.1f} {v_lipfx:10.6f} {1.0:10.2f}")
    print(f"{'linear 4096x25088':<28} {'float64 SVD (exact)':<22} {ms_svd:9.1f} {v_svd:10.6f} {ms_svd / ms_lipfx:10.2f}")
    if args.linear_only:
        return
    layers = {
        "depthwise 384ch 3x3 @14x14": (nn.Conv2d(384, 384, 3, padding=1, groups=384, bias=False), 14),
        "full 512x512x3x3 @14x14": (nn.Conv2d(512, 512, 3, padding=1, bias=False), 14),
    }
    print(f"{'layer':<28} {'method':<22} {'ms':>9} {'value':>10} {'ms / lipfx':>10}")
    for name, (conv, n) in layers.items():
        shape = (conv.in_channels, n, n)
        ms_lipfx, v_lipfx = timed(lambda: layer_bound(conv, shape), args.repeat)
        ms_gram, v_gram = timed(lambda: gram_iteration(conv, n + 2), args.repeat)
        ms_pow, v_pow = timed(lambda: power_full(conv, shape), 1)
        for method, ms, value in [("lipfx (sound)", ms_lipfx, v_lipfx), ("gram iteration (sound)", ms_gram, v_gram),
                                  ("power full op (est.)", ms_pow, v_pow)]:
            print(f"{name:<28} {method:<22} {ms:9.1f} {value:10.5f} {ms / ms_lipfx:10.2f}", flush=True)


if __name__ == "__main__":
    main()
