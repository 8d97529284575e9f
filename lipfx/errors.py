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
