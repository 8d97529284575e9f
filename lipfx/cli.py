"""The ``lipfx`` command line: ``lipfx certify`` (whole-network certificate), ``lipfx convert``
(convert, normalize and save) and ``lipfx bounds`` (per-layer norm bounds)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from . import __version__
from .certify import Certificate, certificate
from .convert import convert
from .errors import LipfxError
from .ops import layer_bound
from .bake import bake
from .normalization import normalized_layers
from .models import MODEL_HELP, first_line as _first_line, load_model
from .saving import save
from .tracing import eval_mode, layer_input_shapes


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise CliError(f"bad input shape {text!r}: expected comma-separated integers like 3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise CliError(f"bad input shape {text!r}: sizes must be positive")
    return shape


def check_runs(model: nn.Module, x: torch.Tensor) -> None:
    """One eval-mode forward, so a wrong input shape is one clear error before any real work."""
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    except Exception as exc:
        shape = tuple(x.shape[1:])
        raise CliError(f"the model does not run on inputs of shape {shape}: {_first_line(exc)}") from None


def _positive(value: Optional[float], flag: str) -> None:
    if value is not None and not (0 < value < math.inf):
        raise CliError(f"{flag} must be a positive finite number, got {value:g}")


@contextlib.contextmanager
def _step(args: argparse.Namespace, text: str) -> Iterator[None]:
    """Progress on stderr: ``text ... 1.2 s`` once the step is done (silent with --quiet)."""
    _say(args, f"{text} ...", end="")
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        _say(args, "")  # the error message starts on its own line
        raise
    _say(args, f" {time.perf_counter() - start:.1f} s")


def _say(args: argparse.Namespace, text: str, end: str = "\n") -> None:
    if not args.quiet:
        print(text, file=sys.stderr, end=end, flush=True)


def _load(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, ...], torch.Tensor]:
    """The model (random init under --seed, or --weights), the input shape and one input."""
    torch.manual_seed(args.seed)
    shape = parse_shape(args.input_shape)
    with _step(args, f"loading {args.model}"):
        model = load_model(args.model, args.weights).eval()
    x = torch.randn(1, *shape)
    check_runs(model, x)
    return model, shape, x


def _convert(model: nn.Module, x: torch.Tensor, args: argparse.Namespace, *, normalize: bool,
             K: Optional[float], lipschitz: Optional[float] = None, scaling: str = "hard") -> nn.Module:
    what = f"bn={args.bn}, separable={args.separable}"
    what += f", K={K:g}" if normalize and K is not None else ""
    what += f", lipschitz={lipschitz:g}" if lipschitz is not None else ""
    with _step(args, f"converting {args.model} ({what})"):
        return convert(model, x, bn=None if args.bn == "keep" else args.bn,
                       separable=None if args.separable == "none" else args.separable,
                       normalize=normalize, K=K if K is not None else 1.0, scaling=scaling, lipschitz=lipschitz)


def _bounds(args: argparse.Namespace) -> None:
    model, shape, _ = _load(args)
    check_runs(model, torch.zeros(1, *shape))  # a wrong shape: one clear error first
    shapes = layer_input_shapes(model, torch.zeros(1, *shape))
    modules = dict(model.named_modules())
    if args.quiet:  # one bound per line, in layer order
        for name, s in shapes.items():
            print(f"{layer_bound(modules[name], s, name=name):.6g}")
        return
    print(f"{'layer':<32} {'input':>14} {'bound':>10}")
    for name, s in shapes.items():
        print(f"{name:<32} {'x'.join(map(str, s)):>14} {layer_bound(modules[name], s, name=name):10.4f}")


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
    _positive(args.K, "--K")
    model, shape, x = _load(args)
    if args.convert or args.K is not None:
        model = _convert(model, x, args, normalize=args.K is not None, K=args.K)
    with _step(args, f"certifying {args.model} at input shape {'x'.join(map(str, shape))}"):
        cert = certificate(model, x)
    if args.json:
        _write(args.json, cert.to_json(indent=1))
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
        path = cert.critical_layers()
        print(f"critical path ({len(path)} nodes): {' -> '.join(path[:12])}{' -> ...' if len(path) > 12 else ''}")


def _convert_command(args: argparse.Namespace) -> None:
    _positive(args.K, "--K")
    _positive(args.lipschitz, "--lipschitz")
    normalize = not args.no_normalize
    if not normalize and args.K is not None:
        raise CliError("--K sets the constants of the normalization: drop --no-normalize or --K")
    model, shape, x = _load(args)
    net = _convert(model, x, args, normalize=normalize, K=args.K, lipschitz=args.lipschitz, scaling=args.scaling)
    layers = len(list(normalized_layers(net)))
    cert = getattr(net, "lipfx_certificate", None)  # the budget fit certified the result already
    if cert is None:
        with _step(args, f"certifying at input shape {'x'.join(map(str, shape))}"):
            cert = certificate(net, x)
    if args.bake:  # the same weights, so the same certificate
        with _step(args, "baking (plain torch modules, loads without lipfx)"):
            net = bake(net)
    bound = cert.bound
    try:
        save(net, args.output)
    except Exception as exc:  # OSError, or torch's RuntimeError for a missing parent directory
        raise CliError(f"cannot write {args.output}: {getattr(exc, 'strerror', None) or _first_line(exc)}") from None
    size = os.path.getsize(args.output)
    if args.quiet:
        print(f"{bound:.6g}")
        return
    kind = "baked (plain torch)" if args.bake else (f"{layers} layers normalized" if normalize else "not normalized")
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB): {kind}; Lipschitz bound {bound:.6g} at {'x'.join(map(str, shape))}")
    print(f"load it with lipfx.load({args.output!r}); certify it with: "
          f"lipfx certify {args.output} --input-shape {args.input_shape}")


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--input-shape", default="3,224,224", help="one input without batch dim, e.g. 3,224,224")
    p.add_argument("--weights", metavar="FILE", help="a state_dict file to load into the model")
    p.add_argument("--seed", type=int, default=0, help="seed for randomly initialised weights")
    p.add_argument("--quiet", action="store_true",
                   help="no progress; print only the bound (bounds: one per layer and line, in layer order)")


def _conversion(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bn", choices=["fold", "remove", "keep"], default="fold", help="BatchNorm (with conversion)")
    p.add_argument("--separable", choices=["exact", "fresh", "none"], default="exact",
                   help="depthwise-separable rewrite (with conversion)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="lipfx", description="Provable Lipschitz bounds for PyTorch models.",
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"lipfx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("certify", help="sound Lipschitz bound of the whole network (lipfx.certificate)",
                       description="sound Lipschitz bound of the whole network (lipfx.certificate)", formatter_class=fmt)
    _common(c)
    c.add_argument("--convert", action="store_true", help="run lipfx.convert first (exact rewrite)")
    c.add_argument("--K", type=float, help="convert and normalize every layer to norm K (implies --convert)")
    _conversion(c)
    c.add_argument("--json", metavar="FILE", help="also write the certificate as JSON")
    c.set_defaults(run=_certify)
    v = sub.add_parser("convert", help="convert (and normalize) a model and save it (lipfx.convert, lipfx.save)",
                       description="convert (and normalize) a model and save it (lipfx.convert, lipfx.save)", formatter_class=fmt)
    _common(v)
    v.add_argument("-o", "--output", required=True, metavar="OUT.pt", help="where to save the converted model")
    v.add_argument("--K", type=float, help="per-layer constant K (None: 1)")
    v.add_argument("--lipschitz", type=float, metavar="L", help="global budget: scale all K so the network is <= L")
    v.add_argument("--scaling", choices=["hard", "soft"], default="hard", help="K, or K*tanh(s) with learnable s")
    v.add_argument("--no-normalize", action="store_true", help="the plain rewrite, without normalization")
    v.add_argument("--bake", action="store_true", help="save plain torch modules (loads without lipfx)")
    _conversion(v)
    v.set_defaults(run=_convert_command)
    p = sub.add_parser("bounds", help="sound operator-norm bound of every conv and linear layer",
                       description="sound operator-norm bound of every conv and linear layer", formatter_class=fmt)
    _common(p)
    p.set_defaults(run=_bounds)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (CliError, LipfxError) as exc:
        print(f"lipfx: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug or an unforeseen input: still one line (LIPFX_DEBUG=1 re-raises)
        if os.environ.get("LIPFX_DEBUG"):
            raise
        print(f"lipfx: error: {_first_line(exc)} (set LIPFX_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
