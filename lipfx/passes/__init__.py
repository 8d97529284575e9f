"""Graph passes over torch.fx GraphModules: plain functions, no global state."""

from .activations import replace_activations
from .batchnorm import fold_batchnorm, remove_batchnorm
from .pooling import replace_global_pooling
from .report import ConversionReport, LayerRecord
from .separable import factorize_conv, rewrite_separable
from .spatial import replace_depthwise

__all__ = [
    "fold_batchnorm",
    "remove_batchnorm",
    "rewrite_separable",
    "replace_activations",
    "replace_global_pooling",
    "replace_depthwise",
    "factorize_conv",
    "ConversionReport",
    "LayerRecord",
]
