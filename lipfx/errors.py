"""Exceptions raised by lipfx. Each message names the module or graph node at fault."""

from __future__ import annotations


class LipfxError(Exception):
    """Base class of every error lipfx raises on purpose."""


class UnsupportedModuleError(LipfxError, TypeError):
    """A module type for which lipfx has no sound bound or rewrite."""


class ShapeError(LipfxError, ValueError):
    """An input shape that does not fit the module it is given for."""


class TraceError(LipfxError, RuntimeError):
    """A model that torch.fx cannot trace."""


class ArgumentError(LipfxError, ValueError):
    """An argument outside what the function accepts (a bad value, a bad combination, a
    state_dict where a model is expected, ...). A ValueError, as such errors were before."""
