"""Spectral normalization with per-layer constants K (docs/math.md, sections 1, 2, 5, 7).

Each conv, linear and :class:`~lipfx.layers.ChannelAffine` of a converted network gets a
``torch.nn.utils.parametrize`` parametrization ``W -> W * scale / bound(W)``, visible in
``print(model)``, with ``scale = K`` (hard) or ``K * tanh(s)`` (soft, ``s`` learnable).

- :mod:`.rescale`: the autograd function that applies the bound's closed-form gradient;
- :mod:`.base`: the parametrization shared by every layer kind (training and eval paths);
- :mod:`.layers`: the layer kinds (power iteration, the FFT spectrum, max|scale|);
- :mod:`.orthogonal`: AOL and (semi-)orthogonal pointwise/linear layers (``constraint=``);
- :mod:`.orthogonal_conv`: AOL and orthogonal (BCOP) kernels for spatial convs kept whole;
- :mod:`.rows`: unit-norm rows for a last layer (``last_layer="unit-rows"``);
- :mod:`.constants`: K as a float, name patterns or a callable; ``set_constants``;
- :mod:`.batching`: every weight computed together when a training forward starts;
- the pass that registers them is :func:`lipfx.passes.normalize`.
"""

from .base import SCALINGS, LipschitzNormalization
from .batching import disable_batching, enable_batching, is_batched
from .constants import KSpec, normalized_layers, power_residuals, resolve_K, set_constants
from .layers import ConvNormalization, DiagonalNormalization, MatrixNormalization
from .options import CONSTRAINTS, NormOptions
from .orthogonal import AOLNormalization, OrthogonalNormalization
from .orthogonal_conv import AOLConvNormalization, OrthogonalConvNormalization
from .rows import UnitRows
from .rescale import TrainBound
from ..passes.normalize import normalize

__all__ = [
    "normalize", "normalized_layers", "power_residuals", "set_constants", "resolve_K", "KSpec", "NormOptions", "SCALINGS",
    "LipschitzNormalization", "MatrixNormalization", "ConvNormalization", "DiagonalNormalization",
    "AOLNormalization", "OrthogonalNormalization", "AOLConvNormalization", "OrthogonalConvNormalization",
    "UnitRows", "CONSTRAINTS",
    "TrainBound", "enable_batching", "disable_batching", "is_batched",
]
