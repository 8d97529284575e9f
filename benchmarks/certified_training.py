"""Certified training side by side: lipfx configurations against orthogonium and deel-torchlip.

    pip install -e ".[bench]"
    python benchmarks/certified_training.py [--data digits|synthetic|both] [--epochs 30] [--seeds 3]
    python benchmarks/certified_training.py --timing     # seconds per epoch only, side by side

Every method trains the same CNN (widths C, C, 2C, 2C with 3x3 convs, the third strided, one
activation after each, global l2 pooling, a last linear layer with unit-norm rows) on the same
data with the same optimizer (Adam), batch size, epochs and loss (lipfx.robust.margin_loss with
L = 1 at the training radius); only the layers' constraint differs. The learning rate is chosen
per method from the same grid on a validation split (seed 0); then every seed trains at that rate.

Each trained network is certified with ``lipfx.certificate`` (the peers' too) and radii come
from ``lipfx.robust.certified_radius`` (pairwise constants of the last layer). Columns: clean and
certified accuracy at three l2 radii; certified constants over empirical lower bounds of the
same maps (the largest Jacobian norm over test points, exact SVD per point, or secant quotient
pushed up by Adam from pairs around them) for the whole network, its features and the pairs that
decide the radii (:func:`tightness`; on the first seed's network, the slow part); seconds per
epoch; PGD flips: l2 PGD at 0.99x each point's certified radius (a certificate that holds gives 0). "own": radii from the peer's own claim (its features 1-Lipschitz, so the pair (t, j) has
constant ||w_t - w_j||), with the same PGD check ("own flips").

Data: scikit-learn's digits (1797 8x8 images that ship inside the wheel: 1297 train, of which the
last 200 validate, and 500 test) and a synthetic 10-class 8x8 task made in code.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import lipfx
import lipfx.activations
from lipfx.layers import L2Pool
from lipfx.robust import certified_radius, final_linear, margin_loss

RADII = (0.1, 0.3, 0.5)
TRAIN_RADIUS = 0.5
TEMPERATURE = 0.25
LRS = (1e-3, 3e-3, 1e-2)
BATCH = 64


# --- data ---------------------------------------------------------------------------------------
def digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return {"train": (x[:1097], y[:1097]), "val": (x[1097:1297], y[1097:1297]), "test": (x[1297:], y[1297:])}


def synthetic() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Ten smooth prototypes of norm 2.5 plus pixel noise of 0.15: separable, not trivially."""
    g = torch.Generator().manual_seed(1234)
    protos = F.avg_pool2d(torch.randn(10, 1, 8, 8, generator=g), 3, 1, 1)
    protos = 2.5 * protos / protos.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    def draw(n: int, seed: int):
        g.manual_seed(seed)
        y = torch.randint(0, 10, (n,), generator=g)
        return protos[y] + 0.15 * torch.randn(n, 1, 8, 8, generator=g), y

    return {"train": draw(1097, 1), "val": draw(200, 2), "test": draw(500, 3)}


# --- the networks -------------------------------------------------------------------------------
def plain_cnn(width: int, act: Callable[[], nn.Module] = nn.ReLU, pool: Callable[[], nn.Module] = L2Pool) -> nn.Module:
    c = width
    return nn.Sequential(nn.Conv2d(1, c, 3, padding=1), act(), nn.Conv2d(c, c, 3, padding=1), act(),
                         nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), act(), nn.Conv2d(2 * c, 2 * c, 3, padding=1), act(),
                         pool(), nn.Flatten(), nn.Linear(2 * c, 10))


def lipfx_net(width: int, **options) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        return lipfx.convert(plain_cnn(width, pool=lambda: nn.AdaptiveAvgPool2d(1)), torch.zeros(1, 1, 8, 8), **options)
    return make


def orthogonium_net(width: int) -> nn.Module:
    from orthogonium.layers import MaxMin, UnitNormLinear
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d

    c = width
    conv = lambda i, o, s=1: AdaptiveOrthoConv2d(i, o, 3, stride=s, padding="same" if s == 1 else 1)  # noqa: E731
    return nn.Sequential(conv(1, c), MaxMin(), conv(c, c), MaxMin(), conv(c, 2 * c, 2), MaxMin(), conv(2 * c, 2 * c),
                         MaxMin(), L2Pool(), nn.Flatten(), UnitNormLinear(2 * c, 10))


def torchlip_net(width: int) -> nn.Module:
    from deel.torchlip import FrobeniusLinear, GroupSort2, SpectralConv2d

    c = width
    conv = lambda i, o, s=1: SpectralConv2d(i, o, 3, stride=s, padding=1)  # noqa: E731
    return nn.Sequential(conv(1, c), GroupSort2(), conv(c, c), GroupSort2(), conv(c, 2 * c, 2), GroupSort2(),
                         conv(2 * c, 2 * c), GroupSort2(), L2Pool(), nn.Flatten(), FrobeniusLinear(2 * c, 10))


def methods(width: int) -> dict[str, tuple[Callable[[], nn.Module], float]]:
    """name -> (builder, the constant the method claims: 1 for networks of 1-Lipschitz layers)."""
    gnp = dict(activation="maxmin", pooling="l2", last_layer="unit-rows")  # every lipfx variant
    return {
        "lipfx convs whole (spectral)": (lipfx_net(width, separable=None, **gnp), math.nan),
        "lipfx convs whole (orthogonal, BCOP)": (lipfx_net(width, separable=None, constraint="orthogonal", **gnp), math.nan),
        "lipfx convs whole (AOL)": (lipfx_net(width, separable=None, constraint="aol", **gnp), math.nan),
        "lipfx separable, spectral pointwise": (lipfx_net(width, **gnp), math.nan),
        "lipfx separable, orthogonal pointwise": (lipfx_net(width, constraint="orthogonal", **gnp), math.nan),
        "lipfx shifts + orthogonal (LipNeXt-style)": (
            lipfx_net(width, separable="fresh", spatial="shift", constraint="orthogonal", **gnp), math.nan),
        "orthogonium (AOC, MaxMin)": (lambda: orthogonium_net(width), 1.0),
        "deel-torchlip (Spectral, GroupSort2)": (lambda: torchlip_net(width), 1.0),
    }


# --- training and evaluation --------------------------------------------------------------------
def margin(net: nn.Module, logits: torch.Tensor, y: torch.Tensor, progress: float) -> torch.Tensor:
    """The benchmark's loss: margin loss with L = 1 at TRAIN_RADIUS throughout."""
    return margin_loss(logits, y, radius=TRAIN_RADIUS, lipschitz=1.0, temperature=TEMPERATURE)


Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


def train(make: Callable[[], nn.Module], data, lr: float, epochs: int, seed: int,
          loss_fn: Loss = margin) -> tuple[nn.Module, float, bool]:
    """(network, seconds per epoch, finite): Adam, one-cycle; ``loss_fn(net, logits, y, progress)``
    with progress the fraction of steps done (default: margin loss with L = 1 at TRAIN_RADIUS)."""
    torch.manual_seed(seed)
    net = make()
    x, y = data["train"]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    step, total = 0, epochs * math.ceil(len(y) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    g = torch.Generator().manual_seed(seed)
    finite = True
    net.train()
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), BATCH):
            idx = perm[i:i + BATCH]
            loss = loss_fn(net, net(x[idx]), y[idx], step / total)
            step += 1
            if not torch.isfinite(loss):
                finite = False
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if not finite:
            break
    return net.eval(), (time.perf_counter() - start) / epochs, finite


def empirical_lipschitz(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, steps: int = 200) -> torch.Tensor:
    """Per point, a lower bound on the Lipschitz constant of ``fn`` (a map whose samples do not
    interact, as a network in eval mode): the larger of the exact Jacobian norm at the point (SVD
    of the outputs x inputs Jacobian) and of secant quotients pushed up by Adam from a pair
    around it, 0.05 apart along the point's top right singular vector (200 steps from there find
    2-3% more than 60 from random pairs did). Plain autograd: the peers update buffers in place."""
    x = x.clone().requires_grad_(True)
    out = fn(x).flatten(1)
    rows = [torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)[0].flatten(1) for k in range(out.shape[1])]
    _, sigma, vh = torch.linalg.svd(torch.stack(rows, 1).double(), full_matrices=False)
    best = sigma[:, 0].float()
    a = x.detach().clone().requires_grad_(True)
    b = (a.detach() + 0.05 * vh[:, 0].reshape(a.shape).to(a.dtype)).requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=3e-2)
    for _ in range(steps):
        quotient = (fn(a) - fn(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1).clamp_min(1e-6)
        best = torch.maximum(best, quotient.detach())
        opt.zero_grad()
        (-quotient.sum()).backward()
        opt.step()
    return best


def tightness(net: nn.Module, cert: lipfx.Certificate, x: torch.Tensor) -> dict[str, float]:
    """The certified constants over empirical lower bounds of the same maps (all >= 1 when sound):
    - "L/emp": the whole network (L includes the last layer's matrix norm, which radii never use);
    - "feat/emp": the features phi that enter the last linear layer W;
    - "pair/emp": per point, the pair (prediction t, class j) that decides its radius, the j
      with the smallest (f_t - f_j) / K_tj: the constant K_tj = L_phi ||w_t - w_j|| over a
      lower bound for f_t - f_j (the largest over the points with that pair), averaged over the
      points."""
    out = {"L/emp": cert.bound / float(empirical_lipschitz(net, x).max())}
    found = final_linear(net, cert)
    if found is None:
        return out
    weight, l_phi = found
    last = net.get_submodule(cert.record(cert.records[-1].inputs[0]).target)
    seen: list[torch.Tensor] = []
    hook = last.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    try:
        def features(z: torch.Tensor) -> torch.Tensor:
            seen.clear()
            net(z)
            return seen[-1]
        out["feat/emp"] = l_phi / float(empirical_lipschitz(features, x).max())
    finally:
        hook.remove()
    with torch.no_grad():
        logits = net(x)
    pair = l_phi * torch.cdist(weight, weight)
    t = logits.argmax(1)
    ratio = (logits.gather(1, t[:, None]) - logits).double() / pair[t].clamp_min(1e-300)
    j = ratio.scatter(1, t[:, None], math.inf).argmin(1)
    lo, hi = torch.minimum(t, j), torch.maximum(t, j)
    d = F.one_hot(lo, logits.shape[1]).to(x) - F.one_hot(hi, logits.shape[1]).to(x)
    emp = empirical_lipschitz(lambda z: (net(z) * d).sum(1, keepdim=True), x).double()
    key = lo * logits.shape[1] + hi
    per_pair = torch.zeros(logits.shape[1] ** 2, dtype=torch.float64).scatter_reduce(0, key, emp, "amax")
    out["pair/emp"] = float((pair[lo, hi] / per_pair[key]).mean())
    return out


def pgd_flips(net: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor, steps: int = 30) -> int:
    """l2 PGD on the margin inside 0.99x each point's certified radius; how many predictions flip."""
    keep = radius > 0
    x, y, eps = x[keep], y[keep], 0.99 * radius[keep].float().view(-1, 1, 1, 1)
    if len(y) == 0:
        return 0
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        logits = net(x + delta)
        other = logits.clone().scatter_(1, y[:, None], -math.inf).amax(1)
        gain = (other - logits.gather(1, y[:, None]).squeeze(1)).sum()
        grad, = torch.autograd.grad(gain, delta)
        with torch.no_grad():
            delta += 2.5 * eps / steps * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta *= torch.clamp(eps / norm.clamp_min(1e-12), max=1.0)
    with torch.no_grad():
        return int((net(x + delta).argmax(1) != y).sum())


def register_peers() -> None:
    """Rules for the peers' modules, in the active op table (call inside ``lipfx.ops.scoped()``).

    - orthogonium's MaxMin and deel-torchlip's GroupSort2 compute lipfx's MaxMin up to the order
      of the outputs (checked here on random inputs), so they get its rule, 1, as leaves; traced
      through, their split/max/min/cat would be bounded by sqrt(2) each.
    - deel-torchlip's SpectralConv2d is an nn.Conv2d whose forward pads first; with zero padding
      the pad is the identity (checked), so nn.Conv2d's rule (the exact FFT bound of the weight
      it uses) holds for it. Traced through, its functional torch.conv2d has no rule.
    - deel-torchlip's FrobeniusLinear runs nn.Linear's forward (checked) on its parametrized
      weight: registered as a leaf it is a module call, so the pairwise radii see its rows (traced
      through, it is an F.linear and only the global radius applies).
    """
    from deel.torchlip import FrobeniusLinear, GroupSort2, SpectralConv2d
    from orthogonium.layers import MaxMin as OrthoMaxMin

    z = torch.randn(4, 6, 3, 3)
    want = lipfx.activations.MaxMin()(z).sort(1).values
    for act in (OrthoMaxMin(), GroupSort2()):
        if not torch.equal(act(z).sort(1).values, want):
            raise AssertionError(f"{type(act).__name__} is not a MaxMin: its rule would not hold")
    lipfx.ops.register(OrthoMaxMin, GroupSort2, rule=lipfx.ops.constant(1.0, "MaxMin (peer)"), leaf=True)
    conv = SpectralConv2d(2, 3, 3, padding=1)
    if conv.old_padding_mode != "zeros" or not torch.equal(conv.pad(z), z):
        raise AssertionError("SpectralConv2d pads: nn.Conv2d's rule would not hold")
    lipfx.ops.register(SpectralConv2d, rule=lipfx.ops.lookup(nn.Conv2d).rule, leaf=True)
    if FrobeniusLinear.forward is not nn.Linear.forward:
        raise AssertionError("FrobeniusLinear has its own forward: nn.Linear's rule would not hold")
    lipfx.ops.register(FrobeniusLinear, rule=lipfx.ops.lookup(nn.Linear).rule, leaf=True)


def radii(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, lipfx.Certificate]:
    """Pairwise certified radii from lipfx's certificate, the peers' rules in scope."""
    with lipfx.ops.scoped():
        register_peers()
        cert = lipfx.certificate(net, x[:1])
    return certified_radius(net, x, y, cert), cert


def claimed_radius(net: nn.Module, logits: torch.Tensor, y: torch.Tensor, claimed: float) -> torch.Tensor:
    """Radii from the method's own claim: features ``claimed``-Lipschitz, so the pair (t, j)
    has constant claimed * ||w_t - w_j|| (the last layer's eval weight: unit rows here)."""
    w = net[-1].weight.detach().double()
    pair = claimed * torch.cdist(w, w)
    gaps = logits.gather(1, y[:, None]) - logits
    per_pair = gaps / pair[y].clamp_min(1e-300)
    per_pair = per_pair.scatter(1, y[:, None], math.inf)
    return torch.where(logits.argmax(1) == y, per_pair.amin(1).clamp_min(0), 0.0).float()


def evaluate(net: nn.Module, data, claimed: float, tight: bool = True) -> dict[str, float]:
    x, y = data["test"]  # float32 throughout: the peers' parametrizations fix their dtype
    radius, cert = radii(net, x, y)
    with torch.no_grad():
        logits = net(x).double()
    out = {"clean": float((logits.argmax(1) == y).float().mean())}
    for r in RADII:
        out[f"cert@{r}"] = float((radius >= r).float().mean())
    if math.isfinite(claimed):
        own = claimed_radius(net, logits, y, claimed)
        out["own@0.3"] = float((own >= 0.3).float().mean())
        out["own flips"] = pgd_flips(net, x, y, own)
    out["L"] = cert.bound
    if tight:  # the slow part (three lower-bound searches): the caller runs it on one seed
        out.update(tightness(net, cert, x[:200]))
    out["pgd flips"] = pgd_flips(net, x, y, radius)
    return out


def run(name: str, data, width: int, epochs: int, seeds: int, only: tuple[str, ...] = ()) -> None:
    print(f"\n## {name}: width {width}, {epochs} epochs, batch {BATCH}, Adam (one-cycle), margin loss at radius "
          f"{TRAIN_RADIUS} (L = 1, temperature {TEMPERATURE}), lr from {LRS} on the validation split, {seeds} seeds\n")
    header = (["method", "lr", "clean"] + [f"cert@{r}" for r in RADII]
              + ["own@0.3", "L", "L/emp", "feat/emp", "pair/emp", "s/epoch", "pgd flips", "own flips", "NaN runs"])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, (make, claimed) in methods(width).items():
        if only and not any(o in label for o in only):
            continue
        val = {}
        for lr in LRS:
            net, _, finite = train(make, data, lr, epochs, 0)
            r, _ = radii(net, *data["val"])
            val[lr] = float((r >= 0.3).float().mean()) if finite else -1.0
        lr = max(val, key=val.get)
        rows, times, nans = [], [], 0
        for seed in range(seeds):
            net, sec, finite = train(make, data, lr, epochs, seed)
            times.append(sec)
            if not finite:
                nans += 1
                continue
            rows.append(evaluate(net, data, claimed, tight=seed == 0))
        def mean(k):  # noqa: E306
            vals = [r[k] for r in rows if k in r]
            return statistics.fmean(vals) if vals else math.nan
        cells = [label, f"{lr:g}", f"{mean('clean'):.3f}"] + [f"{mean(f'cert@{r}'):.3f}" for r in RADII]
        cells += [f"{mean('own@0.3'):.3f}" if math.isfinite(claimed) else "-", f"{mean('L'):.4f}"]
        cells += [f"{mean(k):.3f}" for k in ("L/emp", "feat/emp", "pair/emp")]
        cells += [f"{statistics.fmean(times):.2f}", str(sum(r["pgd flips"] for r in rows)),
                  str(sum(r["own flips"] for r in rows)) if math.isfinite(claimed) else "-", str(nans)]
        print("| " + " | ".join(cells) + " |", flush=True)


def timing(data, width: int, rounds: int = 5, epochs: int = 1, only: tuple[str, ...] = ()) -> None:
    """Seconds per epoch side by side, best of ``rounds`` interleaved rounds (after a one-epoch
    warm-up per method), with each method's ratio to the fastest peer: the benchmark's training
    loop at lr 1e-3, nothing else measured."""
    chosen = {k: v for k, v in methods(width).items() if not only or any(o in k for o in only)}
    best = {label: math.inf for label in chosen}
    for label, (make, _) in chosen.items():
        train(make, data, 1e-3, 1, 0)
    for _ in range(rounds):
        for label, (make, _) in chosen.items():
            best[label] = min(best[label], train(make, data, 1e-3, epochs, 0)[1])
    peers = [t for label, t in best.items() if label.startswith(("orthogonium", "deel"))]
    fastest = min(peers) if peers else math.nan
    print(f"\n## seconds per epoch (best of {rounds} rounds of {epochs} epoch(s), batch {BATCH}, width {width})\n")
    print("| method | s/epoch | / fastest peer |\n|---|---|---|")
    for label, t in best.items():
        print(f"| {label} | {t:.3f} | {t / fastest:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("digits", "synthetic", "both"), default="both")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=(), help="run only the methods whose name contains one of these")
    parser.add_argument("--timing", action="store_true", help="only time an epoch of each method, side by side")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.timing:
        timing(digits() if args.data != "synthetic" else synthetic(), args.width, only=tuple(args.only))
        return
    if args.data in ("digits", "both"):
        run("scikit-learn digits", digits(), args.width, args.epochs, args.seeds, tuple(args.only))
    if args.data in ("synthetic", "both"):
        run("synthetic 8x8, 10 classes", synthetic(), args.width, args.epochs, args.seeds, tuple(args.only))


if __name__ == "__main__":
    main()
