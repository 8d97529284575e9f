"""lipfx: controlled and provable Lipschitz constants for PyTorch models."""

from .errors import LipfxError, ShapeError, TraceError, UnsupportedModuleError
from .certify import Certificate, certificate
from .convert import convert
from .norms import layer_bound

__version__ = "0.1.0"

__all__ = ["convert", "certificate", "Certificate", "layer_bound", "LipfxError", "ShapeError", "TraceError", "UnsupportedModuleError"]
