"""``lipfx.save`` / ``lipfx.load``: whole converted models in one file.

``torch.save(net)`` refuses modules with ``torch.nn.utils.parametrize`` parametrizations (their
class is made at run time). The parametrizations themselves are ordinary modules, so ``save``
detaches them from their layers, pickles the model and the detached parametrizations side by
side, and ``load`` attaches them again: the loaded network has the same weights, constants K,
power-iteration vectors and drift references, and trains on exactly as the saved one would.

Files hold pickled modules, so loading runs code from the file (``weights_only=False``): load
only files you trust, as with any ``torch.save``'d model. Plain models and ``lipfx.bake``
output are saved as they are and load without lipfx (``torch.load(path, weights_only=False)``).
"""

from __future__ import annotations

import copy
import os
from typing import Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .bake import LIPFX_ATTRS, strip_parametrizations
from .errors import LipfxError
from .normalization import LipschitzNormalization, enable_batching, is_batched
from .normalization.base import add_size_check

FORMAT = "lipfx.model/1"
PathLike = Union[str, "os.PathLike[str]"]


def save(net: nn.Module, path: PathLike) -> None:
    """Write ``net`` (converted, normalized or plain) to ``path``; ``net`` is not modified.

    Only ``torch.nn.utils.parametrize`` parametrizations are detached for pickling; everything
    else is pickled as ``torch.save`` would (the model's classes must be importable to load it).
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"lipfx.save expects an nn.Module, got {type(net).__name__}")  # kept a TypeError
    out = copy.deepcopy(net)
    detached: dict[str, dict[str, list[nn.Module]]] = {}
    for name, module in list(out.named_modules()):
        if parametrize.is_parametrized(module):
            detached[name] = _detach(module)
    # a GraphModule pickles its code and submodules only: keep lipfx's attributes beside it
    attrs = {a: getattr(net, a) for a in LIPFX_ATTRS if hasattr(net, a)}  # a GraphModule deepcopy drops them
    batched = [name for name, module in net.named_modules() if is_batched(module)]  # pickling drops hooks
    if not detached and not attrs:
        torch.save(out, path)  # nothing lipfx-specific: loads without lipfx
        return
    torch.save({"format": FORMAT, "lipfx_version": _version(), "module": out, "parametrizations": detached,
                "attrs": attrs, "batched": batched}, path)


def load(path: PathLike, map_location: Union[str, torch.device, None] = None) -> nn.Module:
    """Read a model written by :func:`save` or ``torch.save(model)``.

    Raises :class:`LipfxError` naming the file for a file that holds no model (e.g. a
    state_dict: load it into the model with ``load_state_dict``) or is no torch file at all, and
    ``FileNotFoundError`` for a missing file.
    """
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as exc:  # torch.load's errors for other files vary (zip, pickle, EOF)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LipfxError(f"cannot read model file {os.fspath(path)} (not written by lipfx.save or torch.save?): "
                         f"{type(exc).__name__}: {text}") from exc
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        module = obj["module"]
        for name, attrs in obj["parametrizations"].items():
            host = module.get_submodule(name)
            for attr, plist in attrs.items():
                for p in plist:
                    # unsafe: skip the check call, which would also advance a power iteration
                    parametrize.register_parametrization(host, attr, p, unsafe=True)
                    if getattr(p, "size_dependent", False):
                        add_size_check(host)
        for attr, value in obj.get("attrs", {}).items():
            setattr(module, attr, value)
        for name in obj.get("batched", []):
            enable_batching(module.get_submodule(name))
        return module
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LipfxError(f"{os.fspath(path)} holds a state_dict ({len(obj)} tensors), not a model: build the "
                         "model and call load_state_dict (CLI: MODEL --weights FILE)")
    raise LipfxError(f"{os.fspath(path)} holds a {type(obj).__name__}, not a model")


def _detach(module: nn.Module) -> dict[str, list[nn.Module]]:
    """Remove ``module``'s parametrizations, keeping the unparametrized tensors as plain
    parameters/buffers, and return them per attribute (in application order)."""
    found: dict[str, list[nn.Module]] = {}
    originals = {}
    for attr, plist in module.parametrizations.items():
        if not hasattr(plist, "original"):  # right_inverse returned several tensors
            raise LipfxError(f"cannot save the parametrization of {type(module).__name__}.{attr}: it has several originals")
        found[attr] = list(plist)
        originals[attr] = plist.original
        for p in plist:
            if isinstance(p, LipschitzNormalization):
                p.clear_cache()  # keyed on storage addresses, which loading changes
    strip_parametrizations(module, originals)
    return found


def _version() -> str:
    from . import __version__

    return __version__
