"""The ``lipfx`` command line: ``lipfx certify`` (whole-network certificate) and ``lipfx bounds``
(per-layer norm bounds)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

import torch
from torch import nn

from . import __version__
from .certify import Certificate, certificate
from .convert import convert
from .errors import LipfxError
from .norms import layer_bound


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def load_model(spec: str) -> nn.Module:
    """``torchvision:NAME`` (random init) or ``package.module:factory``."""
    if ":" not in spec:
        raise CliError(f"model {spec!r}: expected 'torchvision:NAME' or 'package.module:factory'")
    source, name = spec.split(":", 1)
    if source == "torchvision":
        try:
            import torchvision
        except ImportError as exc:
            raise CliError("torchvision is not installed (pip install torchvision)") from exc
        try:
            return torchvision.models.get_model(name, weights=None)
        except ValueError as exc:
            raise CliError(f"unknown torchvision model {name!r}") from exc
    try:
        factory = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"cannot import {spec!r}: {exc}") from exc
    return factory()


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise CliError(f"bad input shape {text!r}: expected comma-separated integers like 3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise CliError(f"bad input shape {text!r}: sizes must be positive")
    return shape


def layer_input_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Input shape (without batch) of every module lipfx can bound, from one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape[1:]))

        return hook

    bounded = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, bounded)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except Exception as exc:
        raise CliError(f"the model does not run on inputs of shape {input_shape}: {exc}") from None
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _bounds(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)  # random init is reproducible
    model = load_model(args.model)
    shapes = layer_input_shapes(model, parse_shape(args.input_shape))
    modules = dict(model.named_modules())
    print(f"{'layer':<32} {'input':>14} {'bound':>10}")
    for name, shape in shapes.items():
        print(f"{name:<32} {'x'.join(map(str, shape)):>14} {layer_bound(modules[name], shape, name=name):10.4f}")


def _group_key(target: str) -> str:
    """'layer1.0.conv1.pointwise' -> 'layer1.0'; 'conv1.depthwise' -> 'conv1'."""
    parts = target.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def group_rows(cert: Certificate) -> list[tuple[str, int, float, float]]:
    """(group, nodes, largest own constant, cumulative bound at its last node) per consecutive run
    of nodes in one block (module names up to the first index, e.g. ``layer1.0``). Function nodes
    (adds, reshapes) join the block they follow, so a 150-layer model stays a short table."""
    rows: list[list] = []
    for r in cert.records:
        if r.op in ("placeholder", "output"):
            continue
        own = r.own
        key = _group_key(r.target) if r.target != r.op else (rows[-1][0] if rows else "(input)")
        if rows and rows[-1][0] == key:
            rows[-1][1] += 1
            rows[-1][2] = max(rows[-1][2], own)
            rows[-1][3] = r.bound
        else:
            rows.append([key, 1, own, r.bound])
    return [tuple(r) for r in rows]


def _certify(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model = load_model(args.model).eval()
    shape = parse_shape(args.input_shape)
    x = torch.randn(1, *shape)
    if args.K is not None and not 0 < args.K < float("inf"):
        raise CliError(f"--K must be a positive finite number, got {args.K}")
    if args.convert or args.K is not None:
        norm = f", K={args.K:g}" if args.K is not None else ""
        _say(args, f"converting {args.model} (bn={args.bn}, separable={args.separable}{norm}) ...")
        model = convert(model, x, bn=None if args.bn == "keep" else args.bn,
                        separable=None if args.separable == "none" else args.separable,
                        normalize=args.K is not None, K=args.K if args.K is not None else 1.0)
    _say(args, f"certifying {args.model} at input shape {'x'.join(map(str, shape))} ...")
    cert = certificate(model, x)
    if args.json:
        try:
            with open(args.json, "w") as f:
                f.write(cert.to_json(indent=1))
        except OSError as exc:
            raise CliError(f"cannot write {args.json}: {exc.strerror}") from None
    if args.quiet:
        print(f"{cert.bound:.6g}")
        return
    print(f"{'group':<28} {'nodes':>5} {'largest own':>12} {'cumulative':>12}")
    for name, count, own, cumulative in group_rows(cert):
        print(f"{name[:28]:<28} {count:5d} {own:12.4g} {cumulative:12.4g}")
    print()
    print(f"Lipschitz bound (l2, eval mode): {cert.bound:.6g}")
    if cert.unbounded:
        print("unbounded because of:")
        for c in cert.unbounded:
            print(f"  {c.reason}")
    else:
        path = [
            r.what for r in cert.critical_path()
            if r.op not in ("placeholder", "output") and (r.local != 1.0 or r.composed is not None)
        ]
        print(f"critical path ({len(path)} nodes): {' -> '.join(path[:12])}{' -> ...' if len(path) > 12 else ''}")


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lipfx", description="Provable Lipschitz bounds for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"lipfx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("certify", help="sound Lipschitz bound of the whole network (lipfx.certificate)")
    c.add_argument("model", help="torchvision:NAME or package.module:factory")
    c.add_argument("--input-shape", default="3,224,224", help="one input without batch dim, e.g. 3,224,224")
    c.add_argument("--convert", action="store_true", help="run lipfx.convert first (exact rewrite)")
    c.add_argument("--K", type=float, help="convert and normalize every layer to norm K (implies --convert)")
    c.add_argument("--bn", choices=["fold", "remove", "keep"], default="fold", help="with --convert")
    c.add_argument("--separable", choices=["exact", "fresh", "none"], default="exact", help="with --convert")
    c.add_argument("--json", metavar="FILE", help="also write the certificate as JSON")
    c.add_argument("--quiet", action="store_true", help="print only the bound")
    c.add_argument("--seed", type=int, default=0, help="seed for randomly initialised weights")
    c.set_defaults(run=_certify)
    p = sub.add_parser("bounds", help="sound operator-norm bound of every conv and linear layer")
    p.add_argument("model", help="torchvision:NAME or package.module:factory")
    p.add_argument("--input-shape", default="3,224,224", help="one input without batch dim, e.g. 3,224,224")
    p.add_argument("--seed", type=int, default=0, help="seed for randomly initialised weights")
    p.set_defaults(run=_bounds)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (CliError, LipfxError) as exc:
        print(f"lipfx: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
