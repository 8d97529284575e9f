"""Models named on the command line: ``torchvision:NAME`` (random init), ``package.module:factory``
(a function returning an nn.Module), or a saved model file; and state_dict files loaded into them.

Every failure is one :class:`lipfx.ArgumentError` (or :class:`lipfx.LipfxError` from
:func:`lipfx.load`) naming the model, file or key at fault.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pickle
from typing import Optional

import torch
from torch import nn

from .errors import ArgumentError, LipfxError
from .saving import load

MODEL_HELP = "torchvision:NAME, package.module:factory, or a saved model file (.pt)"


def load_model(spec: str, weights: Optional[str] = None) -> nn.Module:
    """``torchvision:NAME`` (random init), ``package.module:factory``, or a file written by
    ``lipfx convert`` / ``lipfx.save`` / ``torch.save(model)``; then ``weights`` (a state_dict
    file) loaded into it, if given."""
    if os.path.exists(spec) or spec.endswith(_MODEL_SUFFIXES):
        model = _read_model_file(spec)
    elif ":" not in spec:
        raise ArgumentError(f"model {spec!r}: expected 'torchvision:NAME', 'package.module:factory' or a .pt file")
    else:
        model = _build(spec)
    if weights is not None:
        _load_weights(model, weights)
    return model


_MODEL_SUFFIXES = (".pt", ".pth", ".pkl")


def _build(spec: str) -> nn.Module:
    source, name = spec.split(":", 1)
    if source == "torchvision":
        try:
            import torchvision
        except ImportError as exc:
            raise ArgumentError("torchvision is not installed (pip install torchvision)") from exc
        try:
            return torchvision.models.get_model(name, weights=None)
        except ValueError as exc:
            close = difflib.get_close_matches(name, torchvision.models.list_models(), n=4)
            hint = f"; did you mean {', '.join(close)}?" if close else " (torchvision.models.list_models() lists them)"
            raise ArgumentError(f"unknown torchvision model {name!r}{hint}") from exc
    try:
        factory = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as exc:
        raise ArgumentError(f"cannot import {spec!r}: {exc}") from exc
    try:
        model = factory()
    except Exception as exc:
        raise ArgumentError(f"{spec}() failed: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _read_model_file(path: str) -> nn.Module:
    if not os.path.isfile(path):
        raise ArgumentError(f"no such model file: {path}")
    try:
        return load(path, map_location="cpu")
    except LipfxError:
        raise
    except Exception as exc:  # torch.load's errors for damaged files vary (zip, pickle, EOF)
        raise ArgumentError(f"cannot read model file {path}: {first_line(exc)}") from None


def _load_weights(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise ArgumentError(f"no such weights file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refuses anything but tensors and plain containers
        raise ArgumentError(f"cannot read weights file {path}: not a state_dict of tensors (a saved whole "
                       "model is given as MODEL instead)") from None
    except Exception as exc:
        raise ArgumentError(f"cannot read weights file {path}: {first_line(exc)}") from None
    if isinstance(state, dict):  # common checkpoint layouts nest the state_dict
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArgumentError(f"weights file {path} holds no state_dict of tensors")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise ArgumentError(f"weights {path} do not fit the model: {detail[0] if detail else first_line(exc)}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]!r})" for what, keys in
                 (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
        raise ArgumentError(f"weights {path} do not fit the model: {', '.join(parts)} keys")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
