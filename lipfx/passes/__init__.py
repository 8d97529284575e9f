"""Graph passes over torch.fx GraphModules: plain functions, no global state."""

from .activations import replace_activations
from .batchnorm import fold_batchnorm, remove_batchnorm
from .report import ConversionReport, LayerRecord
from .separable import factorize_conv, rewrite_separable

__all__ = [
    "fold_batchnorm",
    "remove_batchnorm",
    "rewrite_separable",
    "replace_activations",
    "factorize_conv",
    "ConversionReport",
    "LayerRecord",
]
