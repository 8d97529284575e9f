"""torch.fx tracing with shape propagation, and errors that name the module at fault."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ArgumentError, TraceError
from .ops.table import is_leaf, lookup

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


class _Tracer(fx.Tracer):
    """fx.Tracer that keeps user-named submodules opaque and remembers where tracing failed."""

    def __init__(self, leaf_modules: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.failed_at: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # a module type with its own op table entry (a user's rule, lipfx's Squeeze) stays one
        # node: inlined, its rule would never be used
        return (module_qualified_name in self.leaf_names or is_leaf(m)
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # innermost module first: the exception unwinds outwards
                self.failed_at = self.path_of_module(m)
            raise


def as_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def wrap_torch_layer(model: nn.Module) -> nn.Module:
    """``nn.Sequential(model)`` when ``model`` is itself a layer the tracer keeps whole.

    fx traces a root module through its forward (a bare Conv2d becomes F.conv2d on a get_attr
    weight, which no pass or rule handles); wrapped, the layer is a called module like anywhere
    else in a network.
    """
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    torch_layer = type(model).__module__.startswith("torch.nn.modules") and not isinstance(model, containers)
    return nn.Sequential(model) if torch_layer or is_leaf(model) else model


def trace(model: nn.Module, leaf_modules: Iterable[str] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; a failure raises TraceError naming the innermost module."""
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.failed_at
        place = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else (
            f"the top-level forward of {type(model).__name__}"
        )
        raise TraceError(
            f"torch.fx cannot trace {place}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            f"Hint: pass leaf_modules=['{where or 'name.of.submodule'}'] to keep that submodule opaque "
            "(it is then left as it is)."
        ) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the block, then every submodule back in the mode it was
    in (``module.train(flag)`` would reset a training model's frozen BatchNorm layers too)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:  # parents first: each call resets the subtree the later ones fix
            m.train(training)


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, example_inputs: Inputs) -> None:
    """Record each node's output shape in ``node.meta['tensor_meta']`` (eval semantics, no grad)."""
    with eval_mode(gm):
        ShapeProp(gm).propagate(*as_tuple(example_inputs))


@torch.no_grad()
def layer_input_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Input shape (without batch) of every module with an operator-norm bound (a
    ``layer_bound`` piece in the op table), first call each, from one eval-mode forward with
    hooks: for models torch.fx cannot trace. Traced graphs use :func:`input_shapes`."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape[1:]))

        return hook

    def bounded(m: nn.Module) -> bool:
        entry = lookup(type(m))
        return entry is not None and entry.layer_bound is not None

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if bounded(m)]
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def input_shapes(gm: fx.GraphModule) -> dict[str, list[tuple[int, ...]]]:
    """Each called submodule's input shapes (one per distinct call, without the batch dim), from
    the ``tensor_meta`` that :func:`propagate_shapes` records."""
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        meta = node.args[0].meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            continue
        shape = tuple(int(s) for s in meta.shape[1:])
        seen = shapes.setdefault(str(node.target), [])
        if shape not in seen:
            seen.append(shape)
    return shapes


def check_model(model: Any, who: str) -> None:
    """An ArgumentError naming what ``model`` is when it is not an nn.Module."""
    if isinstance(model, nn.Module):
        return
    if isinstance(model, Mapping) and model and all(isinstance(v, torch.Tensor) for v in model.values()):
        raise ArgumentError(f"{who}: model is a state_dict ({len(model)} tensors, e.g. {next(iter(model))!r}), not an "
                            "nn.Module: build the model and load it with model.load_state_dict(state_dict), then pass "
                            "the model")
    if isinstance(model, str):
        raise ArgumentError(f"{who}: model is the string {model!r}; pass an nn.Module (for a CLI-style name such as "
                            f"'torchvision:resnet18', 'package.module:factory' or a .pt file, build it with "
                            f"lipfx.models.load_model({model!r}))")
    raise ArgumentError(f"{who}: model must be an nn.Module, got {type(model).__name__}")


def check_inputs(example_inputs: Any, who: str = "lipfx.convert") -> None:
    """An ArgumentError unless ``example_inputs`` is a tensor or a non-empty tuple of tensors."""
    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(items, (tuple, list)) or not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise ArgumentError(f"{who}: example_inputs must be a tensor or a tuple of tensors (with batch dim), "
                            f"got {type(example_inputs).__name__}")
