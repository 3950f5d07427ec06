"""Networks and layers shared by the families (masks, Lipschitz layers, activations)."""

from .activations import ELU, LipSwish, LipschitzActivation, get_activation, register_activation  # noqa: F401
from .cpila import CPila  # noqa: F401  (registers the "cpila" activation)
from .lipschitz import (  # noqa: F401
    LipschitzDenseNN,
    LipschitzLinear,
    LipschitzMADE,
    matrix_norm_bound,
    spectral_norm_bounds,
    spectral_norm_product,
)
from .masked import autoregressive_masks, quasi_autoregressive_degrees, quasi_autoregressive_masks  # noqa: F401
from .mexican_hat import H_MIN, MexicanHatNN, mexican_hat, mexican_hat_biases  # noqa: F401
from .monotone_net import MonotoneNet  # noqa: F401
