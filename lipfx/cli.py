"""The ``lipfx`` command line. Today: per-layer norm bounds of a model (``lipfx bounds``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

import torch
from torch import nn

from . import __version__
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lipfx", description="Provable Lipschitz bounds for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"lipfx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
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
