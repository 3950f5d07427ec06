"""Networks and layers shared by the families (masks, Lipschitz layers, activations)."""

from .activations import ELU, LipSwish, LipschitzActivation, get_activation, register_activation  # noqa: F401
from .lipschitz import LipschitzLinear, matrix_norm_bound  # noqa: F401
from .masked import quasi_autoregressive_degrees, quasi_autoregressive_masks  # noqa: F401
