"""The torchvision model zoo of the tests, built once per session (see the fixtures in conftest.py).

Building a model (inception_v3's truncated-normal init above all) and converting it are the
costly parts that several test files repeated; here each is done once and handed out as a
deepcopy, so tests that mutate their model (train steps, .double(), state_dict loads) cannot leak
into one another.
"""

from __future__ import annotations

import copy
import functools

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def randomize_batchnorm(model: nn.Module) -> None:
    """Random running statistics and affine parameters, so folding is really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)


def _key(kwargs: dict) -> tuple:
    return tuple(sorted(kwargs.items()))


@functools.lru_cache(maxsize=None)
def _build(name: str, key: tuple) -> nn.Module:
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None, **dict(key)).eval()
        randomize_batchnorm(model)
        with torch.no_grad():  # zero-initialised heads (ViT) would make every output 0 (bound 0)
            for m in model.modules():
                if isinstance(m, nn.Linear) and not m.weight.any():
                    nn.init.normal_(m.weight, std=0.02)
    finally:
        torch.set_rng_state(rng)  # a cache hit and a miss leave the caller's random stream alike
    return model


def shared(name: str, **kwargs) -> nn.Module:
    """The session's one instance of zoo model `name` (eval mode, seed 0, random BatchNorm
    statistics, no all-zero Linear weight). Read-only: do not train, cast or load into it."""
    return _build(name, _key(kwargs))


def zoo(name: str, **kwargs) -> nn.Module:
    """A private copy of :func:`shared` (free to mutate)."""
    return copy.deepcopy(shared(name, **kwargs))


@functools.lru_cache(maxsize=None)
def _converted(name: str, shape: tuple, key: tuple) -> nn.Module:
    import lipfx

    rng = torch.get_rng_state()
    try:
        return lipfx.convert(shared(name, **dict(key)), torch.zeros(shape), normalize=False).eval()
    finally:
        torch.set_rng_state(rng)


def converted(name: str, shape: tuple, **kwargs) -> nn.Module:
    """A private copy of ``lipfx.convert(zoo(name), x, normalize=False)`` for inputs of `shape`,
    converted once per session."""
    original = _converted(name, tuple(shape), _key(kwargs))
    net = copy.deepcopy(original)
    for attr, value in vars(original).items():  # GraphModule's deepcopy drops lipfx_report & co.
        if attr.startswith("lipfx_") and not hasattr(net, attr):
            setattr(net, attr, copy.deepcopy(value))
    return net


zoo.shared = shared  # the conftest fixture hands out `zoo` with these two attached
zoo.converted = converted
