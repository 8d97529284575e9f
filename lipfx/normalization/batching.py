"""Batched normalization: every normalized weight computed together when the forward starts.

A forward pre-hook on the model computes all training-mode weights back to back (their small
kernels run together, before the big convolutions have evicted their code and data from the
caches), and their backward runs together after the network's. Layers of one kind that say so
(``batch_key``) are computed by one call: one-matrix pointwise and linear layers share their
power steps' vector work (:meth:`MatrixNormalization.train_forwards`), depthwise layers of one kernel
shape their power spectrum's (:meth:`ConvNormalization.train_forwards`). A layer takes the prepared weight
only when the tensor, its version and the grad mode match; otherwise it computes its own.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .base import LipschitzNormalization


def enable_batching(model: nn.Module) -> None:
    """Compute all of ``model``'s normalized weights together when its training forward starts
    (what ``normalize(batched=True)`` sets up; see there). Idempotent.

    The forward hooks survive ``copy.deepcopy`` of a GraphModule (which drops forward hooks
    itself) and ``lipfx.save``/``load``; ``lipfx.bake`` removes them.
    """
    if is_batched(model):
        return
    model.register_forward_pre_hook(_prepare_hook)
    model.register_forward_hook(_release_hook, always_call=True)
    copy_hooks = getattr(model, "_deepcopy_hooks", None)  # GraphModule runs these on its copies
    if isinstance(copy_hooks, list) and enable_batching not in copy_hooks:
        copy_hooks.append(enable_batching)


def disable_batching(model: nn.Module) -> None:
    """Undo :func:`enable_batching` on ``model``: each weight is computed at its layer again."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in (_prepare_hook, _release_hook)]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    copy_hooks = getattr(model, "_deepcopy_hooks", None)
    if isinstance(copy_hooks, list) and enable_batching in copy_hooks:
        copy_hooks.remove(enable_batching)


def is_batched(model: nn.Module) -> bool:
    """Whether :func:`enable_batching` is in effect on ``model`` itself."""
    return _prepare_hook in model._forward_pre_hooks.values()


def _first_normalizations(model: nn.Module) -> Iterator[tuple[LipschitzNormalization, torch.Tensor]]:
    """(parametrization, its input) for every lipfx parametrization applied first to a tensor."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for plist in module.parametrizations.values():
                if isinstance(plist[0], LipschitzNormalization) and hasattr(plist, "original"):
                    yield plist[0], plist.original


def _prepare_hook(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook (``normalize(batched=True)``): compute all training-mode weights now.

    Each layer's forward takes its weight from here when the tensor, its version and the grad
    mode are unchanged, and computes it itself otherwise (a layer called twice, a weight
    swapped by ``functional_call``, ...)."""
    if not model.training or torch.compiler.is_compiling():
        return  # eval mode caches its weights; a compiled graph computes each where it is used
    grad = torch.is_grad_enabled()
    batches: dict = {}  # batch_key -> layers computed by one train_forwards call
    for p, weight in _first_normalizations(model):
        if p.training:
            key = p.batch_key(weight)
            if key is None:  # a layer that computes its own
                p._prepared = (weight, weight._version, grad, p._train_forward(weight))
            else:
                batches.setdefault(key, []).append((p, weight))
    for layers in batches.values():
        for (p, weight), out in zip(layers, type(layers[0][0]).train_forwards(layers)):
            p._prepared = (weight, weight._version, grad, out)


def _release_hook(model: nn.Module, args: tuple, output: object) -> None:
    """Forward hook: drop what a forward did not use (runs on exceptions too)."""
    if not model.training or torch.compiler.is_compiling():
        return
    for p, _ in _first_normalizations(model):
        p._prepared = None
