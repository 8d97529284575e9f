"""Cost of a training step with lipfx's normalization, side by side with the same network unnormalized
and with two peers on the same layers.

    python benchmarks/training_overhead.py [--cases a,b,c] [--steps 5] [--device cpu|cuda] [--malloc tuned|default]
                                           [--amp none|bf16|fp16] [--channels-last] [--power-iters 2]
                                           [--compile] [--variants plain,lipfx,...]

Cases (issue 4): (a) MobileNetV2 at 224x224, (b) ResNet-34 with every conv rewritten as
depthwise-separable, BatchNorm removed, at 32x32 (the paper's CIFAR setup), (c) a small 3-D conv
net on 1x64x64x64 volumes, (d) MobileNetV2 at 160x160 (issue 17: the fixed cost per step).
Variants, all on the same converted network:
  plain       lipfx.convert(..., normalize=False)
  lipfx       lipfx.convert(...) (FFT bounds for depthwise parts, warm power iteration on the
              small pointwise/linear matrices), all weights computed when the forward starts
  lipfx-layer the same with batched=False: each weight computed just before its layer runs
  torch-sn    torch.nn.utils.parametrizations.spectral_norm on every conv/linear (reshaped-kernel
              heuristic, NOT a bound on a conv's norm; one power step per forward)
  full-power  one warm-started power step per forward on the full conv operator (i-ResNet's
              approach; its state is input-sized)
Step = forward + backward + SGD step (under torch.autocast with --amp; fp16 adds a GradScaler).
weights = every parametrized weight computed as the training forward computes it, and a fixed
gradient back-propagated through them, alone (median over at least 10 rounds; not with
--compile): the normalization's fixed cost per step, which the step time's variance hides.
Variants run interleaved, round after round, and the median step time is reported with its ratio
to `plain`; state = bytes of normalization buffers; syncs = tensor values read on the host in one
step (lipfx.host_syncs: each is a wait for the device on a GPU).

On CPU, glibc's malloc by default hands every large activation back to the kernel when it is
freed, so each step page-faults its activations in again: on 2 cores that is up to 40% of a
MobileNetV2 step, in system time that varies from step to step by more than the differences
measured here. `--malloc tuned` (the default) keeps freed memory in the process (mallopt: no
mmap below 1 GiB, no trimming), as the caching allocators recommended for CPU training
(jemalloc, tcmalloc) do; it applies to all variants alike. `--malloc default` leaves glibc as it is.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

import lipfx
from lipfx.host_syncs import count_host_syncs
from lipfx.tracing import input_shapes

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FullOperatorPower(nn.Module):
    """W / sigma, sigma from one warm power step on the layer's whole operator at its input size."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.apply_op = (lambda x, w: module._conv_forward(x, w, None)) if isinstance(module, CONVS) else (
            lambda x, w: nn.functional.linear(x, w))
        u = torch.randn(1, *input_shape, device=module.weight.device)
        self.register_buffer("u", u / u.norm())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.enable_grad():
                u = self.u.detach().requires_grad_(True)
                out = self.apply_op(u, weight.detach())
                (g,) = torch.autograd.grad(out, u, grad_outputs=out.detach())  # A^T A u
            with torch.no_grad():
                self.u.copy_(g / g.norm().clamp_min(1e-30))
        sigma = self.apply_op(self.u, weight).norm()
        return weight / sigma


def variants(model: nn.Module, x: torch.Tensor, bn: str, power_iters: int = 2) -> dict[str, nn.Module]:
    plain = lipfx.convert(model, x[:1], normalize=False, bn=bn)
    out = {"plain": plain, "lipfx": lipfx.convert(model, x[:1], K=1.0, bn=bn, power_iters=power_iters),
           "lipfx-layer": lipfx.convert(model, x[:1], K=1.0, bn=bn, power_iters=power_iters, batched=False)}
    sn = lipfx.convert(model, x[:1], normalize=False, bn=bn)
    for name, m in list(sn.named_modules()):
        if isinstance(m, CONVS + (nn.Linear,)):
            spectral_norm(m)
    out["torch-sn"] = sn
    full = lipfx.convert(model, x[:1], normalize=False, bn=bn)
    shapes = input_shapes(full)  # recorded by convert at the example input
    for name, m in list(full.named_modules()):
        if name in shapes and isinstance(m, CONVS + (nn.Linear,)):
            parametrize.register_parametrization(m, "weight", FullOperatorPower(m, shapes[name][0]))
    out["full-power"] = full
    return out


def state_bytes(net: nn.Module) -> int:
    """Buffers and extra parameters that the normalization keeps beside the weights."""
    total = 0
    for m in net.modules():
        if parametrize.is_parametrized(m):
            for plist in m.parametrizations.values():
                total += sum(b.numel() * b.element_size() for b in plist.buffers())
                total += sum(p.numel() * p.element_size() for p in plist.parameters() if p is not plist.original)
    return total


def step_fn(net: nn.Module, x: torch.Tensor, classes: int, amp: str = "none"):
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    y = torch.randint(0, classes, (x.shape[0],), device=x.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(x.device.type) if amp == "fp16" else None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(net(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return step


def host_syncs(step) -> int:
    """Tensor values one step reads on the host (GradScaler's inf check reads one by design)."""
    with count_host_syncs() as syncs:
        step()
    return syncs.total


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def interleaved_medians(steps: dict, rounds: int, device: str, warmup: int = 2) -> dict[str, float]:
    """Median seconds per step of each variant, run one after another round after round (so
    drifts in machine speed hit all alike), after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds + warmup):
        for k, fn in steps.items():
            t = timed(fn, device)
            if r >= warmup:
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def add_malloc_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="CPU: keep freed memory in the process (see above) or leave glibc's default")


def set_malloc(choice: str) -> str:
    """Apply ``--malloc``; returns what is in effect. glibc only: with "tuned", freed blocks stay
    in the process instead of going back to the kernel."""
    if choice == "default":
        return "glibc default"
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default (no glibc)"
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = all(libc.mallopt(opt, value) == 1 for opt, value in
             ((m_mmap_threshold, 2**30), (m_trim_threshold, 2**31 - 1), (m_top_pad, 2**30)))
    return "kept in process (mallopt)" if ok else "default (mallopt refused)"


def small_3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(1, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.BatchNorm3d(32), nn.ReLU(),
        nn.Conv3d(32, 32, 3, stride=2, padding=1), nn.BatchNorm3d(32), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 2),
    )


CASES = {
    "a": ("MobileNetV2 @224", lambda: torchvision.models.mobilenet_v2(num_classes=1000), (3, 224, 224), "fold", 1000),
    "b": ("ResNet-34 separable @32, no BN", lambda: torchvision.models.resnet34(num_classes=10), (3, 32, 32), "remove", 10),
    "c": ("3-D conv net @1x64^3", small_3d, (1, 64, 64, 64), "fold", 2),
    "d": ("MobileNetV2 @160", lambda: torchvision.models.mobilenet_v2(num_classes=1000), (3, 160, 160), "fold", 1000),
}


def weights_step(net: nn.Module):
    """A function that computes every parametrized weight of ``net`` as its training forward
    does (the model's forward pre-hooks first: lipfx's batched path) and back-propagates a fixed
    random gradient through them: the normalization's own fixed cost per step, without the
    convolutions whose step-to-step variance hides it in the step time. None without any."""
    mods = [m for m in net.modules() if parametrize.is_parametrized(m)]
    if not mods:
        return None
    names = [(m, n) for m in mods for n in m.parametrizations]
    with torch.no_grad():
        grads = [torch.randn_like(getattr(m, n)) for m, n in names]
    leaves = [p for p in net.parameters()]

    def step() -> None:
        for hook in list(net._forward_pre_hooks.values()):
            hook(net, ())
        try:
            torch.autograd.backward([getattr(m, n) for m, n in names], grads)
        finally:
            for hook in list(net._forward_hooks.values()):
                hook(net, (), None)
        for p in leaves:
            p.grad = None

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="a,b,c")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (each runs every variant once)")
    ap.add_argument("--batch", default="a=8,b=128,c=2,d=8", help="batch size per case, e.g. a=8,b=128,c=2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="torch.autocast dtype")
    ap.add_argument("--channels-last", action="store_true", help="channels_last memory format (4-D inputs)")
    ap.add_argument("--power-iters", type=int, default=2, help="lipfx's power steps per training step")
    ap.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) every variant's forward")
    ap.add_argument("--variants", default="plain,lipfx,lipfx-layer,torch-sn,full-power")
    add_malloc_option(ap)
    args = ap.parse_args()
    malloc = set_malloc(args.malloc)
    batch = dict((k, int(v)) for k, v in (kv.split("=") for kv in args.batch.split(",")))
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; malloc: {malloc}; amp: {args.amp}; "
          f"channels_last: {args.channels_last}; compiled: {args.compile}; {args.steps} timed rounds after 2 warm-up rounds")
    print(f"{'case':<32} {'variant':<11} {'step (ms)':>10} {'ratio':>7} {'weights (ms)':>12} {'state bytes':>12} {'syncs':>6}")
    for key in args.cases.split(","):
        label, make, shape, bn, classes = CASES[key]
        model = make().eval()
        x = torch.randn(batch[key], *shape)
        nets = {k: v.to(args.device).train() for k, v in variants(model, x, bn, args.power_iters).items()
                if k in args.variants.split(",")}
        x = x.to(args.device)
        if args.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            nets = {k: v.to(memory_format=torch.channels_last) for k, v in nets.items()}
        run = {k: torch.compile(v, fullgraph=True) for k, v in nets.items()} if args.compile else nets
        steps = {k: step_fn(v, x, classes, args.amp) for k, v in run.items()}
        for fn in steps.values():
            fn()  # first steps (and compilation) outside the counter
        syncs = {k: host_syncs(fn) for k, fn in steps.items()}
        medians = interleaved_medians(steps, args.steps, args.device)
        own = {} if args.compile else {k: fn for k, fn in ((k, weights_step(v)) for k, v in nets.items()) if fn}
        own = interleaved_medians(own, max(args.steps, 10), args.device) if own else {}
        for k, med in medians.items():
            weights = f"{own[k] * 1e3:12.1f}" if k in own else f"{'-':>12}"
            print(f"{label + ' b=' + str(batch[key]):<32} {k:<11} {med * 1e3:10.1f} {med / medians['plain']:7.3f} "
                  f"{weights} {state_bytes(nets[k]):12,d} {syncs[k]:6d}")


if __name__ == "__main__":
    main()
