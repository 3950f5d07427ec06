"""Input validation shared by every flow.

All checks raise :class:`ValueError` with a message that names what was expected and what came, so a
user who feeds a ``(B, 3)`` tensor to a 2-dimensional flow reads ``expected event size 2 ... got 3``
instead of a shape error from deep inside a matrix multiply.
"""

from __future__ import annotations

import numbers

import torch
from pyro.distributions import is_validation_enabled

__all__ = [
    "SINGLE_PASS",
    "broadcast_context",
    "check_context",
    "check_dim",
    "check_event",
    "check_finite",
    "check_like",
    "check_single_pass",
]

#: values of the direction switch ``single_pass`` that every family whose two directions differ in
#: cost accepts: ``"log_prob"`` makes the inverse (data -> noise, ``log_prob`` of external data) the
#: single-pass direction, for density estimation; ``"sample"`` makes ``_call`` (noise -> data,
#: ``rsample`` and ``log_prob`` of the flow's own samples) single-pass, for guides.
SINGLE_PASS = ("log_prob", "sample")


def check_single_pass(value) -> str:
    """Check the direction switch ``single_pass`` (one of :data:`SINGLE_PASS`) and return it."""
    if value not in SINGLE_PASS:
        raise ValueError(f"single_pass must be one of {SINGLE_PASS}, got {value!r}")
    return value


def check_dim(value, name: str, minimum: int = 1) -> int:
    """Check that a size argument is an integer ``>= minimum`` and return it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _event_error(name: str, expected: int, x: torch.Tensor) -> ValueError:
    got = x.shape[-1] if x.dim() > 0 else "none (a 0-d tensor)"
    return ValueError(
        f"{name}: expected event size {expected} in the last dimension, got {got} "
        f"(shape {tuple(x.shape)})"
    )


def check_event(x, expected: int, name: str = "input") -> torch.Tensor:
    """Check that ``x`` is a floating tensor whose last dimension is ``expected``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != expected:
        raise _event_error(name, expected, x)
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating point tensor, got dtype {x.dtype}")
    return x


def check_context(context, expected: int, name: str = "context", finite: bool | None = None) -> torch.Tensor:
    """Check a context tensor: floating point, last dimension ``expected``, and finite.

    The finiteness check reads the tensor's values back to the host (a synchronisation on a GPU),
    so it follows Pyro's convention for argument checks: it runs when ``finite=True``, or, with the
    default ``finite=None``, when Pyro's validation is on
    (:func:`pyro.distributions.is_validation_enabled`, on by default). Turn it off for speed with
    ``pyro.enable_validation(False)`` once the pipeline is known to be clean.
    """
    check_event(context, expected, name=name)
    if finite is None:
        finite = is_validation_enabled()
    if finite:
        check_finite(context, name=name)
    return context


def check_like(x: torch.Tensor, ref: torch.Tensor | None, name: str = "input") -> torch.Tensor:
    """Check that ``x`` has the dtype and device of ``ref`` (a parameter or the context)."""
    if ref is None:
        return x
    if x.dtype != ref.dtype:
        raise ValueError(
            f"{name}: expected dtype {ref.dtype} (the flow's parameters), got {x.dtype}; "
            f"convert the input or call .to({x.dtype}) on the flow"
        )
    if x.device != ref.device:
        raise ValueError(
            f"{name}: expected device {ref.device} (the flow's parameters), got {x.device}; "
            f"move the input or call .to('{x.device}') on the flow"
        )
    return x


def check_finite(x: torch.Tensor, name: str = "input") -> torch.Tensor:
    """Raise ``ValueError`` if ``x`` holds NaN or infinite values (used before iterative solves).

    One host synchronisation (the ``bool`` of a reduction); the count in the message is computed
    only when the check fails.
    """
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name}: expected finite values, got {bad} non-finite entr{'y' if bad == 1 else 'ies'} "
            f"(shape {tuple(x.shape)})"
        )
    return x


def broadcast_context(x: torch.Tensor, context: torch.Tensor):
    """Broadcast the batch dimensions of ``x`` (..., D) and ``context`` (..., C) against each other.

    Returns ``(x, context)`` expanded to a common batch shape. A context of shape ``(B, C)`` thus
    works with inputs of shape ``(B, D)``, ``(N, B, D)`` (vectorised particles) or ``(D,)``.
    """
    try:
        batch = torch.broadcast_shapes(x.shape[:-1], context.shape[:-1])
    except RuntimeError as e:
        raise ValueError(
            f"context batch shape {tuple(context.shape[:-1])} does not broadcast against "
            f"input batch shape {tuple(x.shape[:-1])}"
        ) from e
    return x.expand(batch + x.shape[-1:]), context.expand(batch + context.shape[-1:])
