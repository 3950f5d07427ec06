"""A budget-free learning-rate decay: Adam whose rate halves each time a parameter's trajectory is stationary.

Constant-rate Adam never converges in the iterate: once a parameter has reached its optimum it keeps
jittering with the gradient noise, with an amplitude of the order of the learning rate (Adam's steps are
normalised by the gradient's root mean square, so the step is about ``lr`` whatever the noise). On a narrow
posterior (a thousand data points) that is a sizeable fraction of a posterior sd, and the error of the
*final* iterate is set by the rate, not by the guide. A fixed decay (``lrd``) needs a step budget, which a
user rarely knows.

:class:`PlateauAdam` (a ``torch.optim.Optimizer``) is Pyro's ``ClippedAdam`` (elementwise gradient clamp,
``lrd``) with a stationarity test per parameter group (a :class:`~pyro_flows.infer.PlateauTest`, the same
statistic ``AutoFlow``'s warmup uses): over a window of steps, per coordinate, the net displacement divided
by the path length. A coordinate still travelling moves mostly one way (ratio near 1); one that only
jitters goes back and forth (ratio ~0.1). When the group's statistic is below ``threshold`` its rate is
multiplied by ``factor``, down to ``min_lr_ratio`` times the initial rate, and the test restarts (a full
window at the new rate). Stochastic approximation tests of this kind: Pflug (1983, the sign of successive
gradient inner products), Lang, Xiao and Zhang, "Using statistics to automate stochastic optimization"
(SASA, NeurIPS 2019). The test reads the parameters after each step: two tensor operations per parameter and
step, and one host synchronisation every ``check_every`` steps (none once a group is at its floor).

``reduce`` picks the group statistic: ``"max"`` (the largest ratio over the coordinates: one slow direction
still drifting is enough to wait; right for a location or scale vector) or ``"mean"`` (the mean ratio: for
tensors with many coordinates, e.g. a network's weights or a Cholesky factor, whose largest ratio grows with
their number even under pure jitter, so a threshold on the max would never pass).

:func:`PlateauAdam` in this module's namespace of ``pyro_flows.infer`` is the Pyro optimiser (a
``pyro.optim.PyroOptim``, usable with any guide, with per-parameter arguments like every Pyro optimiser);
``AutoFlow.optimizer()`` returns one. Its state (moments, current rates, the tests' windows) is in the
``state_dict`` of each per-parameter optimiser, so ``get_state`` / ``set_state`` carry it.
"""

from __future__ import annotations

import torch
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam

from .autoguide import PlateauTest

__all__ = ["PlateauAdam", "PlateauAdamOptimizer"]

_REDUCE = ("max", "mean")


class PlateauAdamOptimizer(ClippedAdam):
    """``ClippedAdam`` whose per-group rate is multiplied by ``factor`` each time the group's parameters are
    stationary (see the module docstring).

    Arguments:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay, clip_norm, lrd, centered_variance: as for Pyro's ``ClippedAdam``.
        factor: the rate's multiplier at each decay (in (0, 1)).
        min_lr_ratio: the floor of the rate, as a fraction of the initial rate (in (0, 1]).
        window, threshold, check_every: the :class:`~pyro_flows.infer.PlateauTest` settings.
        reduce: ``"max"`` or ``"mean"``: the group statistic over the coordinates.

    Example:
        >>> import torch
        >>> x = torch.nn.Parameter(torch.zeros(3))
        >>> opt = PlateauAdamOptimizer([x], lr=0.1, window=50, check_every=25, clip_norm=float("inf"))
        >>> g = torch.Generator().manual_seed(0)
        >>> for _ in range(400):  # the gradient of 0.5 |x|^2 plus noise: x converges, then jitters
        ...     x.grad = x.detach() + torch.randn(3, generator=g)
        ...     opt.step()
        >>> opt.param_groups[0]["lr"] < 0.1
        True
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay=0,
                 clip_norm: float = 10.0, lrd: float = 1.0, centered_variance: bool = False, factor: float = 0.5,
                 min_lr_ratio: float = 0.01, window: int = 400, threshold: float = 0.3, check_every: int = 200,
                 reduce: str = "max"):
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        if not 0 < min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in (0, 1], got {min_lr_ratio!r}")
        if reduce not in _REDUCE:
            raise ValueError(f"reduce must be one of {_REDUCE}, got {reduce!r}")
        PlateauTest(window, threshold, check_every)  # validates the test's settings
        self._schedule = dict(factor=factor, min_lr_ratio=min_lr_ratio, window=window, threshold=threshold,
                              check_every=check_every, reduce=reduce)
        self._tests = []
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip_norm=clip_norm,
                         lrd=lrd, centered_variance=centered_variance)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key, value in self._schedule.items():
            group.setdefault(key, value)
        group.setdefault("min_lr", group["lr"] * group["min_lr_ratio"])
        group.setdefault("decays", 0)
        self._tests.append(None)

    def _test(self, i):
        if self._tests[i] is None:
            g = self.param_groups[i]
            self._tests[i] = PlateauTest(g["window"], g["threshold"], g["check_every"], reduce=g["reduce"])
        return self._tests[i]

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for i, group in enumerate(self.param_groups):
            if group["lr"] <= group["min_lr"]:
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            test = self._test(i)
            if test.update(*params):
                group["lr"] = max(group["lr"] * group["factor"], group["min_lr"])
                group["decays"] += 1
                test.reset()
        return loss

    def state_dict(self):
        state = super().state_dict()
        state["plateau_tests"] = [None if t is None else t.state_dict() for t in self._tests]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        tests = state_dict.pop("plateau_tests", None)
        super().load_state_dict(state_dict)
        self._tests = [None] * len(self.param_groups)
        for i, t in enumerate(tests or ()):
            if t is not None and i < len(self._tests):
                self._test(i).load_state_dict(t)


def PlateauAdam(optim_args, clip_args=None):
    """The Pyro optimiser of :class:`PlateauAdamOptimizer`: a ``pyro.optim.PyroOptim`` (one torch optimiser
    per parameter, so each parameter has its own stationarity test and rate).

    Arguments:
        optim_args: the optimiser's arguments (a dict, or a callable ``(module_name, param_name) -> dict``
            for per-parameter arguments, as for every Pyro optimiser).
        clip_args: Pyro's optional gradient-norm clipping arguments.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> from pyro.infer.autoguide import AutoNormal
        >>> pyro.clear_param_store()
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> svi = SVI(model, AutoNormal(model), PlateauAdam({"lr": 0.02}), Trace_ELBO())
        >>> isinstance(svi.step(), float)
        True
    """
    return PyroOptim(PlateauAdamOptimizer, optim_args, clip_args)

