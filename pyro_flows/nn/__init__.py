"""Networks and layers shared by the families (masks, Lipschitz layers, activations)."""

from .activations import ELU, LipSwish, LipschitzActivation, get_activation, register_activation  # noqa: F401
from .cpila import CPila  # noqa: F401  (registers the "cpila" activation)
from .lipschitz import LipschitzLinear, LipschitzMADE, matrix_norm_bound  # noqa: F401
from .masked import autoregressive_masks, quasi_autoregressive_degrees, quasi_autoregressive_masks  # noqa: F401
