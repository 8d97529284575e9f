"""Cost of a residual-flow training step with lipfx's certified blocks, side by side with the same
blocks unnormalized and with i-ResNet's power iteration on the full conv operator.

    python benchmarks/invertible_overhead.py [--cases a,b] [--steps 10] [--device cpu|cuda] [--malloc tuned|default]
                                             [--power-iters 2]

Flow (issue 6): Squeeze(2), then 4 `InvertibleResidual` blocks (coeff 0.9), each branch
conv3x3 - ELU - conv1x1 - ELU - conv3x3 (convs kept whole). Cases: (a) 1x16x16 inputs, hidden 32;
(b) 3x32x32 inputs, hidden 64 (batch sizes: --batch a=64,b=32). Step = forward with log-det (power series, 5
terms, Hutchinson, Neumann-series gradient) + backward of the negative log-likelihood + Adam step.
Variants, on the same blocks and the same log-det code:
  plain       the branches' weights as plain parameters (lipfx.bake of the converted branch)
  lipfx       InvertibleResidual as built (the FFT spectrum of each conv with warm power steps per
              frequency block, warm power iteration on 1x1s)
  full-power  plain branches with one warm power step per forward on each conv's whole operator
              (i-ResNet's estimate; its state is input-sized)
Variants run interleaved, round after round; the median step time is reported with its ratio to
`plain`, and the bytes of normalization state per block. After the timed steps, `worst norm/limit`
is the largest true operator norm (power iteration on the real conv at its input size, float64)
of a conv's training-mode weight divided by the limit the variant claims for it (lipfx: its K;
full-power: 1): above 1 means the claimed constraint does not hold. `--malloc`: as in
training_overhead.py (default: freed memory kept in the process, for all variants alike).
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipfx.bake import bake
from lipfx.invertible import InvertibleResidual, InvertibleSequential, Squeeze
from lipfx.normalization import normalized_layers
from lipfx.norms import operator_norm
from lipfx.tracing import input_shapes

from training_overhead import CONVS, FullOperatorPower, add_malloc_option, interleaved_medians, set_malloc, state_bytes

CASES = {"a": ("1x16x16, hidden 32", (1, 16, 16), 32), "b": ("3x32x32, hidden 64", (3, 32, 32), 64)}


def branch(channels: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ELU(), nn.Conv2d(hidden, hidden, 1), nn.ELU(),
                         nn.Conv2d(hidden, channels, 3, padding=1))


def flows(shape: tuple[int, ...], hidden: int, blocks: int = 4, power_iters: int = 2) -> dict[str, InvertibleSequential]:
    c, h, w = shape
    example = torch.zeros(1, 4 * c, h // 2, w // 2)
    lip = InvertibleSequential(Squeeze(2), *[InvertibleResidual(branch(4 * c, hidden), 0.9, example, power_iters=power_iters)
                                             for _ in range(blocks)])
    out = {"lipfx": lip}
    for variant in ("plain", "full-power"):
        flow = InvertibleSequential(Squeeze(2), *[InvertibleResidual(branch(4 * c, hidden), 0.9, example) for _ in range(blocks)])
        flow.load_state_dict(lip.state_dict())
        for block in list(flow)[1:]:
            shapes = input_shapes(block.branch)
            block.branch = bake(block.branch).train()  # same weights, no normalization
            block.full_shapes = shapes
            if variant == "full-power":
                for name, m in block.branch.named_modules():
                    if isinstance(m, CONVS):
                        parametrize.register_parametrization(m, "weight", FullOperatorPower(m, shapes[name][0]))
        out[variant] = flow
    return {k: out[k] for k in ("plain", "lipfx", "full-power")}


@torch.no_grad()
def worst_ratio(flow: InvertibleSequential, variant: str) -> float:
    """max over convs of true norm (training-mode weight) / claimed limit; nan for `plain`."""
    if variant == "plain":
        return float("nan")
    worst = 0.0
    for block in list(flow)[1:]:
        shapes = input_shapes(block.branch) if variant == "lipfx" else block.full_shapes
        limits = {n: p.constant() for n, _, p in normalized_layers(block.branch)} if variant == "lipfx" else None
        for name, m in block.branch.named_modules():
            if not isinstance(m, CONVS):
                continue
            w = m.weight.detach().double()  # training mode: the weight the last step used
            conv = lambda x, m=m, w=w: m._conv_forward(x, w, None)  # noqa: E731
            with torch.enable_grad():
                true = operator_norm(conv, shapes[name][0], iters=300)
            worst = max(worst, true / (limits[name] if limits else 1.0))
    return worst


def step_fn(flow: InvertibleSequential, x: torch.Tensor):
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4)
    gen = torch.Generator(device=x.device).manual_seed(0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        z, logdet = flow.forward_and_logdet(x, "series", n_terms=5, generator=gen)
        nll = 0.5 * z.flatten(1).square().sum(1) + 0.5 * z[0].numel() * math.log(2 * math.pi) - logdet
        nll.mean().backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="a,b")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (each runs every variant once)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", default="a=64,b=32", help="batch size per case")
    ap.add_argument("--power-iters", type=int, default=2, help="lipfx's power steps per training step")
    add_malloc_option(ap)
    args = ap.parse_args()
    malloc = set_malloc(args.malloc)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; malloc: {malloc}; {args.steps} timed rounds after 2 warm-up rounds")
    print(f"{'case':<28} {'variant':<11} {'step (ms)':>10} {'ratio':>7} {'state bytes/block':>18} {'worst norm/limit':>17}")
    for key in args.cases.split(","):
        label, shape, hidden = CASES[key]
        batch = dict((k, int(v)) for k, v in (kv.split("=") for kv in args.batch.split(",")))[key]
        nets = {k: v.to(args.device).train() for k, v in flows(shape, hidden, power_iters=args.power_iters).items()}
        x = torch.randn(batch, *shape, device=args.device)
        medians = interleaved_medians({k: step_fn(v, x) for k, v in nets.items()}, args.steps, args.device)
        for k, flow in nets.items():
            med, base = medians[k], medians["plain"]
            per_block = state_bytes(flow) // (len(flow) - 1)
            worst = worst_ratio(flow, k)
            print(f"{label + ' b=' + str(batch):<28} {k:<11} {med * 1e3:10.1f} {med / base:7.3f} {per_block:18,d} {worst:17.5f}")


if __name__ == "__main__":
    main()
