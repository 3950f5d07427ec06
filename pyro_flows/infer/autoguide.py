"""``AutoFlow``: a normalizing-flow autoguide that starts where ``AutoMultivariateNormal`` ends.

Construction. For a model whose unconstrained latent vector has size D, :class:`AutoFlow` uses

    z = loc + L f(eps),    eps ~ Normal(0, I_D),    L = scale[:, None] * scale_tril,

(with the fixed frame of the Laplace start, below, ``loc`` and ``L`` are relative to it) where ``f`` is a
stack of ``num_layers`` layers of a registered family (``pyro_flows.flow(name, D,
num_layers)``, which puts the family's permutations between layers; :data:`DEFAULT_FLOW` when no
family is given) or any user transform, and ``loc`` / ``L`` are exactly ``AutoMultivariateNormal``'s:
``loc`` starts at the model's initial point (``init_loc_fn``,
:func:`~pyro.infer.autoguide.initialization.init_to_median` by default), ``scale`` (softplus-positive)
at ``init_scale`` (0.1) and ``scale_tril`` (unit lower triangular) at ``I``. ``affine_rank="diag"``
drops ``scale_tril`` (``AutoDiagonalNormal``'s affine part). The constrained values are then
``biject_to(support)(z)`` per site, as in every :class:`~pyro.infer.autoguide.AutoContinuous` guide
(plates, constrained latents and ``Predictive`` work as for Pyro's guides).

Laplace start (``laplace=True``, default; :mod:`pyro_flows.infer.laplace`). Before the first step the
guide finds the mode ``m`` of the model's log joint in the unconstrained space (L-BFGS) and its curvature
``H`` there, and keeps the Laplace Gaussian ``N(m, H^{-1})`` only if its ELBO estimate beats the default
start's. The affine part then lives in that frame, ``z = m + P (loc + L f(eps))`` with ``P P^T = H^{-1}``,
``loc = 0`` and ``L = I`` at the start: the optimiser's steps are in units of the posterior's own scales,
which on a badly conditioned posterior (correlated regression coefficients, an intercept against a
covariate near 2000) saves thousands of steps, and the start is not undone by steps of the learning rate
on a coordinate whose posterior sd is a thousand times smaller. On a funnel the curvature is useless and
the comparison refuses it: the start is then ``AutoMultivariateNormal``'s, bit for bit. Measurements:
``docs/autoflow.md``.

Identity start and warmup. With ``init="identity"`` (default) every flow layer is set to the exact
identity map by its ``init_identity_()`` (:func:`init_identity`; the output layer of each conditioner
is zeroed, so the gradient does not vanish); permutations between identity layers map ``N(0, I)`` to
``N(0, I)``, so the guide is then *exactly* ``AutoMultivariateNormal`` (the same ``log_prob`` of the
same ``z``, tested). While that holds the layers are skipped: ``get_posterior`` returns
``MultivariateNormal(loc, scale_tril=L)``, the same object and cost per step as
``AutoMultivariateNormal``. The guide counts its own training calls (calls with gradients on) and
switches the flow on by the ``warmup`` rule: ``"plateau"`` (default) when a :class:`PlateauTest` of the
affine parameters' trajectory says they only jitter (the guide cannot see the loss, but it sees its own
parameters after every optimiser step), a fixed number of steps, or ``0`` (from the start). So a plain
``SVI(model, guide, AutoFlow.optimizer(), Trace_ELBO())`` loop gets the schedule; ``guide.flow_on``
tells which phase it is in. A guide whose flow is not exactly the identity (``init="default"``, a layer
without ``init_identity_``, trained tensors loaded from the param store, or ``affine="base"`` with
permutations) runs the flow from the first step.

Optimiser. :meth:`AutoFlow.optimizer` is a :func:`~pyro_flows.infer.PlateauAdam` (Pyro's ``ClippedAdam``
whose rate halves each time a parameter's trajectory is stationary, :mod:`pyro_flows.infer.schedule`: no
step budget to choose) with separate learning rates for the affine part (0.02, ``AutoMultivariateNormal``'s
usual rate, unclipped) and the flow's networks (smaller, with an elementwise gradient clamp);
:meth:`AutoFlow.optim_args` gives the per-parameter arguments for another Pyro optimiser. Defaults and the
measurements that chose them: ``docs/autoflow.md``.

Choices where the requirements are loose:

* Where the affine layer sits. ``affine="output"`` (default) applies the affine layer *after* the
  flow, so the flow always acts on standardised O(1) coordinates whatever the posterior's location
  and scale are. Flows whose non-linearity is concentrated near the origin (bounded sinusoidal
  terms, splines with linear tails, Lipschitz residual maps) would otherwise see inputs far in
  their linear tails (a posterior centred at 100 with scale 0.01) and could not bend them.
  ``affine="base"`` gives ``z = f(loc + L eps)`` (the affine layer directly on the base
  noise) for users who want the literal "affine layer at the base". Both are
  ``Normal(loc, L L^T)`` when ``f`` is the identity (``"base"`` up to the permutations).
* Parameters are created on the model's device and dtype (those of the initial point), inside a
  ``torch.device`` context, so nothing is allocated on the default device behind the user's back
  (Pyro's ``AutoNormalizingFlow`` builds its transform on the default device and dtype).
* ``median()`` and ``quantiles()`` have no closed form for a flow: they are Monte Carlo estimates
  from ``num_quantile_samples`` draws (default 4000; the quantile's standard error is then about
  ``sqrt(q (1 - q) / S) / density``), computed per element *in the constrained space*, so they are
  the marginal quantiles of each constrained variable even for non-elementwise constraints.

Transform caching (what the cache does and the stale-graph pitfall). Pyro transforms with
``cache_size=1`` remember the last ``(x, y)`` pair, matched by object identity: ``rsample`` stores
``(eps_k, z_k)`` for every layer, and the following ``log_prob(z)`` of the *same tensor* reads the
layer inputs back from the cache instead of inverting numerically (essential for flows whose
inverse is a solve). A new tensor never hits the cache, so ``log_prob`` of new data always computes
with the current parameters. The pitfall is the *same* tensor after an optimiser step: the cached
input was computed with the old parameters and its graph may already have been freed by
``backward()``, so ``log_prob`` would mix old and new parameters or raise "Trying to backward
through the graph a second time". :class:`AutoFlow` therefore clears every cache of its transforms
each time it builds its posterior (once per guide call, i.e. once per SVI step); the caches then
only ever link a sample to its own ``log_prob`` within one step. (``pyro_flows``' own
``FlowTransform`` also drops its cache when its parameters' version counters change, but updates
written through ``p.data``, as Pyro's ``ClippedAdam`` does, bypass those counters; the per-call
clearing covers every optimiser and Pyro's built-in transforms too.) Code that keeps a distribution
object alive across optimiser steps should call :func:`clear_transform_cache` after each step.

Saving and loading. ``pyro.get_param_store().save(path)`` then, in a new session,
``pyro.get_param_store().load(path)`` and a new ``AutoFlow`` with the same model and flow: the guide
takes the trained tensors from the store when it builds its flow (its first call). Pyro's own
``AutoNormalizingFlow`` does not: ``pyro.module`` keeps the freshly initialised flow and leaves the
trained tensors unused in the store, silently. Its recipe is to build the guide with one call, then
swap the stored tensors in::

    pyro.get_param_store().load(path)
    guide = AutoNormalizingFlow(model, init_transform_fn)
    guide(*args)  # builds guide.transform
    pyro.module("AutoNormalizingFlow.transform", guide.transform, update_module_params=True)

(or save and load ``guide.state_dict()`` with ``torch.save`` / ``guide.load_state_dict``).

References:
    Rezende and Mohamed, "Variational inference with normalizing flows", ICML 2015.
    Kingma et al., "Improved variational inference with inverse autoregressive flow", NeurIPS 2016.
    Pyro's ``AutoNormalizingFlow`` / ``AutoMultivariateNormal`` (pyro.infer.autoguide.guides).
"""

from __future__ import annotations

import copy
import math
import numbers
import weakref

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalComposeTransformModule, ConstantConditionalTransform
from pyro.distributions.transforms import AffineTransform, ComposeTransform, LowerCholeskyAffine
from pyro.distributions.transforms import Permute as TorchPermute
from pyro.distributions.util import eye_like
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from pyro.params import param_with_module_name
from torch.distributions import Transform, biject_to

from ..registry import get_flow
from ..stacking import flow as _stack_flow
from ..transforms._base import Permute, VersionCheckedCache
from .path_gradient import PathGradientPosterior, frozen_log_prob, in_path_gradient_elbo

__all__ = ["DEFAULT_FLOW", "AutoFlow", "PlateauTest", "clear_transform_cache", "init_identity", "make_flow"]

_AFFINE = ("output", "base")
_AFFINE_RANK = ("full", "diag")
_INIT = ("identity", "default")

#: the family ``AutoFlow(model)`` uses, its layer count and layer arguments (chosen by measurement:
#: ``docs/autoflow.md``)
DEFAULT_FLOW = "autm_autoregressive"
DEFAULT_NUM_LAYERS = 2
DEFAULT_FLOW_KWARGS: dict = {}
#: the default family's conditioner widths: ``[min(max(DEFAULT_HIDDEN_FACTOR * D, DEFAULT_MIN_HIDDEN),
#: MAX_HIDDEN_FACTOR * D)] * 2`` (the family's own default, ``10 D``, costs about 3x more per step at D = 26)
DEFAULT_HIDDEN_FACTOR = 2
#: (64, not 16: on eight_schools_centered, D = 10, widths 64 gave PSIS k-hat 0.59 / 0.55 / 0.41 at 30 s over
#: seeds 0-2 against 0.78 / 0.75 / 0.72 with widths 20, at the same number of steps: docs/autoflow.md)
DEFAULT_MIN_HIDDEN = 64
#: never wider than the family's own default ``10 D`` (the 2-D banana at widths 64 and flow rate 0.01 reached
#: KL 0.19 after 1500 steps against 0.03 at widths 16)
MAX_HIDDEN_FACTOR = 10
#: the families ``AutoFlow(model, family)`` gives the default family's widths (their own default is ``10 D`` too,
#: so the rule only narrows them; ``docs/autoflow.md``); the others keep their own defaults
WIDTH_RULE_FAMILIES = ("autm_autoregressive", "autm_coupling", "sinusoidal")
#: ``warmup="plateau"``'s :class:`PlateauTest` ``patience``: the flow is also switched on after this many
#: steps of a trajectory that keeps drifting (1000, not 2000, since the path gradient became the default: its
#: flow steps cost about twice a plain one, and on eight_schools_centered at 30 s the later switch left one
#: fit in six with 680 flow steps and mean errors of 0.15 sd; ``docs/autoflow.md``)
DEFAULT_PATIENCE = 1000
#: :meth:`AutoFlow.optimizer`'s defaults: the affine part's rate (``AutoMultivariateNormal``'s usual
#: 0.02), the flow's rate and the flow's elementwise gradient clamp
DEFAULT_LR = 0.02
DEFAULT_FLOW_LR = 0.002
DEFAULT_CLIP = 10.0
#: the conditioner width :data:`DEFAULT_FLOW_LR` is the rate for. A guide whose width rule gives narrower
#: conditioners (``D < 7``) trains its flow at ``DEFAULT_FLOW_LR * FLOW_LR_WIDTH / width`` when ``flow_lr`` is
#: not given: one Adam step moves every weight by about the rate, so the network's output moves by about
#: ``width x rate`` (the hidden-layer rule of Yang et al.'s muP for Adam); wider conditioners (``D > 32``) keep
#: the reference rate (not measured there). ``docs/autoflow.md``, "The flow's rate and the width".
FLOW_LR_WIDTH = 64
#: the attribute of a flow parameter (set by ``AutoFlow``) that carries its rate's multiplier to
#: :meth:`AutoFlow.optim_args`, which only sees parameter names
_FLOW_LR_SCALE = "_pyro_flows_flow_lr_scale"


def clear_transform_cache(obj) -> int:
    """Forget every cached ``(x, y)`` pair of the transforms in ``obj``.

    ``obj`` may be a ``Transform``, an ``nn.Module`` (every sub-module that is a transform), a
    ``TransformedDistribution`` or an :class:`AutoFlow` guide; compositions are walked recursively.
    Returns how many caches were cleared. Call it after an optimiser step when a distribution or
    sample is reused across steps (see the module docstring).

    Example:
        >>> import torch, pyro.distributions as dist
        >>> from pyro.distributions.transforms import affine_autoregressive
        >>> t = affine_autoregressive(2)
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.).to_event(1), [t])
        >>> z = d.rsample()
        >>> clear_transform_cache(d) >= 1
        True
    """
    seen = set()
    count = 0

    def visit(o):
        nonlocal count
        if o is None or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, dist.TransformedDistribution):
            for t in o.transforms:
                visit(t)
            return
        if isinstance(o, Transform):
            if getattr(o, "_cache_size", 0) == 1 and getattr(o, "_cached_x_y", None) != (None, None):
                o._cached_x_y = None, None
                count += 1
            # FlowTransform's one record (x, y, log-det), which serves its cache
            elif o.__dict__.pop("_last_pair", None) is not None and getattr(o, "_cache_size", 0) == 1:
                count += 1
            o.__dict__.pop("_last_pair", None)
            inv = getattr(o, "_inv", None)
            if isinstance(inv, weakref.ref):
                inv = inv()
            if isinstance(inv, Transform):
                visit(inv)
            for p in getattr(o, "parts", ()) or ():
                visit(p)
            base = getattr(o, "base_transform", None)
            if base is not None:
                visit(base)
        if isinstance(o, torch.nn.Module):
            for m in o.children():
                visit(m)

    visit(obj)
    return count


class _LowerCholeskyAffine(VersionCheckedCache, LowerCholeskyAffine):
    pass


class _AffineTransform(VersionCheckedCache, AffineTransform):
    pass


def make_flow(flow, input_dim: int, num_layers: int = 4, context_dim: int | None = None, **kwargs):
    """Build a flow stack from a family name or a user callable.

    Arguments:
        flow: a name in ``pyro_flows.FLOWS`` (stacked by :func:`pyro_flows.flow` with the family's
            permutations), or a callable ``(input_dim) -> Transform`` (``(input_dim, context_dim) ->
            ConditionalTransform`` when ``context_dim`` is given), e.g. a ``functools.partial`` of
            a Pyro built-in.
        input_dim: the event size D.
        num_layers: layers for a family name (ignored for a callable).
        context_dim: build a conditional stack when given.
        **kwargs: passed to every layer of a family (ignored for a callable, which should bind its
            own arguments).

    Example:
        >>> from pyro.distributions.transforms import affine_autoregressive
        >>> make_flow(affine_autoregressive, 3)(torch.zeros(5, 3)).shape
        torch.Size([5, 3])
    """
    if isinstance(flow, str):
        get_flow(flow)  # ValueError listing the registered names
        return _stack_flow(flow, input_dim, num_layers=num_layers, context_dim=context_dim, **kwargs)
    if callable(flow):
        if kwargs:
            raise ValueError(f"keyword arguments {sorted(kwargs)} are only used with a family name; "
                             "bind them into the callable instead")
        return flow(input_dim) if context_dim is None else flow(input_dim, context_dim)
    raise ValueError(f"flow must be a family name or a callable, got {type(flow).__name__}")


def _load_from_param_store(name: str, module: torch.nn.Module) -> bool:
    """Make ``module`` use the tensors the param store holds under ``name`` (after ``load``).

    Pyro registers a plain ``nn.Module`` inside a guide with ``pyro.module(name, module)``, which
    puts *new* parameters in the store but leaves the module's own tensors in place when the store
    already holds trained ones: after ``pyro.get_param_store().load(...)`` a freshly built guide
    would silently keep its untrained flow. ``update_module_params=True`` swaps the stored tensors
    into the module; a stored tensor of another shape (a different model or flow) is an error.

    Stores saved with an older layout of the module's parameters (one tensor per weight and bias,
    before the networks packed them into one) are read through the module's ``load_state_dict``,
    whose hooks translate the old keys; the old entries are then replaced by the new ones in the
    store. Stored keys the module cannot place are an error, never silently ignored.
    Returns whether the store held tensors for the module (then they are in use now).
    """
    store = pyro.get_param_store()
    prefix = param_with_module_name(name, "")
    current = dict(module.named_parameters())
    legacy = [k for k in list(store.keys()) if k.startswith(prefix) and k[len(prefix):] not in current]
    found = False
    if legacy:
        state = module.state_dict()
        state.update({k[len(prefix):]: store[k].detach() for k in legacy})
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"the param store holds tensors under {name!r} that the flow built here cannot "
                             f"use ({str(exc)[:300]}); clear the store or build the same flow") from exc
        for k in legacy:
            del store[k]
        found = True
    for pname, p in current.items():
        key = param_with_module_name(name, pname)
        if key in store:
            found = True
            if store[key].shape != p.shape:
                raise ValueError(
                    f"the param store holds {key!r} with shape {tuple(store[key].shape)}, but the flow "
                    f"built here has shape {tuple(p.shape)}; clear the store or build the same flow"
                )
    pyro.module(name, module, update_module_params=True)
    return found


def init_identity(module) -> bool:
    """Call ``init_identity_()`` on every layer of a flow that has one; whether the flow is now the
    identity up to its permutations.

    ``module`` is a transform or a (conditional) compose module of layers. Permutations are left
    alone (identity layers with permutations between them map ``N(0, I)`` to ``N(0, I)``); a layer
    without an exact identity initialisation (a Pyro built-in, or a family whose ``init_identity_``
    raises ``NotImplementedError``) keeps its own initialisation, and the result is then ``False``.

    Example:
        >>> import torch, pyro_flows
        >>> f = pyro_flows.flow("autm_coupling", 4, num_layers=2)
        >>> init_identity(f)
        True
        >>> x = torch.randn(3, 4)
        >>> bool((f(x) == x.flip(-1)).all())  # two identity layers around a reversing permutation
        True
    """
    parts = _parts(module)
    exact = True
    for part in parts:
        if _is_permutation(part):
            continue
        method = getattr(part, "init_identity_", None)
        try:
            if method is None:
                raise NotImplementedError
            method()
        except NotImplementedError:
            exact = False
    return exact


def _parts(module) -> list:
    """The layers of a (conditional) compose module, or ``[module]``."""
    parts = getattr(module, "parts", None)
    if parts is None and isinstance(module, ConditionalComposeTransformModule):
        parts = module.transforms
    return list(parts) if parts is not None else [module]


def _is_permutation(part) -> bool:
    if isinstance(part, ConstantConditionalTransform):  # a conditional stack's wrapped permutation
        part = part.transform
    return isinstance(part, (Permute, TorchPermute))


def _has_permutation(module) -> bool:
    return any(_is_permutation(p) for p in _parts(module))


def flow_lr_scale(module_name: str, param_name: str) -> float:
    """The multiplier of the default flow rate for the parameter Pyro names ``(module_name, param_name)``: what
    the ``AutoFlow`` that registered it set (``AutoFlow.flow_lr_scale``), 1 for any other parameter."""
    store = pyro.get_param_store()
    key = param_with_module_name(module_name, param_name)
    if key not in store:
        return 1.0
    value = store[key]
    unconstrained = getattr(value, "unconstrained", None)  # the registered tensor (the store returns its image)
    tensor = unconstrained() if unconstrained is not None else value
    return float(getattr(tensor, _FLOW_LR_SCALE, 1.0))


class PlateauTest:
    """A noise-aware plateau test of a parameter trajectory (``update`` once per optimiser step).

    Over the last ``window`` updates it compares, coordinate by coordinate, the net displacement
    ``|theta_t - theta_{t-window}|`` with the path length ``sum |theta_s - theta_{s-1}|``. A
    coordinate still travelling towards its optimum moves mostly one way (ratio near 1); one that
    only jitters around it (SGD noise, even with Adam's momentum) goes back and forth (ratio of order
    ``sqrt(correlation time / window)``, about 0.1 at the defaults). The trajectory has plateaued
    when the *largest* ratio over the coordinates is below ``threshold``: one slow direction still
    drifting is enough to wait. Checked every ``check_every`` updates (one host synchronisation
    each) once ``window`` increments are recorded.

    Arguments:
        window: updates the ratio is taken over.
        threshold: the plateau level of the largest ratio.
        check_every: updates between checks.
        patience: if given, :meth:`update` also returns ``True`` from this many updates on, plateau
            or not (a trajectory that keeps drifting that long is one the affine part alone is slow
            on).
        reduce: ``"max"`` (default: the largest ratio over the coordinates) or ``"mean"`` (their mean:
            for tensors with many coordinates, whose largest ratio grows with their number even under
            pure jitter).

    Example:
        >>> import torch
        >>> test = PlateauTest(window=100, check_every=50)
        >>> g = torch.Generator().manual_seed(0)
        >>> any(test.update(torch.full((3,), 0.01 * k)) for k in range(300))  # a steady trend
        False
        >>> test = PlateauTest(window=100, check_every=50)
        >>> any(test.update(torch.randn(3, generator=g)) for _ in range(300))  # jitter only
        True
    """

    def __init__(self, window: int = 400, threshold: float = 0.3, check_every: int = 200,
                 patience: int | None = None, reduce: str = "max"):
        for name, value in (("window", window), ("check_every", check_every), ("patience", patience)):
            if name == "patience" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.patience = None if patience is None else int(patience)
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
        self.window, self.threshold, self.check_every = int(window), float(threshold), int(check_every)
        self.reduce = reduce
        self.reset()
        #: the group statistic (largest or mean displacement / path-length ratio) at the latest check
        #: (``None`` before the first)
        self.statistic = None

    def reset(self):
        """Forget the recorded trajectory (the next :meth:`update` starts a new window)."""
        self.count = 0
        self._last = None
        self._steps = None

    def state_dict(self) -> dict:
        """The test's state (the recorded window), for saving with an optimiser's state."""
        return {"count": self.count, "last": self._last, "steps": self._steps, "statistic": self.statistic}

    def load_state_dict(self, state: dict):
        self.count, self._last, self._steps = int(state["count"]), state["last"], state["steps"]
        self.statistic = state.get("statistic")

    def update(self, *tensors) -> bool:
        """Record the current parameter values; whether the trajectory has plateaued."""
        if len(tensors) == 1:
            x = tensors[0].detach().reshape(-1)
        else:
            x = torch.cat([t.detach().reshape(-1) for t in tensors])
        if self._last is None or self._last.shape != x.shape:
            self._last, self._steps, self.count = x.clone(), x.new_zeros((self.window, x.numel())), 0
            return False
        torch.sub(x, self._last, out=self._steps[self.count % self.window])
        self._last.copy_(x)
        self.count += 1
        if self.patience is not None and self.count >= self.patience:
            return True
        if self.count < self.window or self.count % self.check_every:
            return False
        path = self._steps.abs().sum(0)
        moving = path > 0
        ratio = self._steps.sum(0).abs()[moving] / path[moving]
        if not ratio.numel():
            self.statistic = 0.0
        else:
            self.statistic = float(ratio.max() if self.reduce == "max" else ratio.mean())
        return self.statistic < self.threshold


class AutoFlow(AutoContinuous):
    """A normalizing-flow guide over all continuous latents: ``z = loc + L f(eps)``.

    ``L`` is lower triangular, ``scale[:, None] * scale_tril`` with ``scale_tril`` unit lower
    triangular, parameterised and initialised as in Pyro's ``AutoMultivariateNormal``; ``f`` is a
    stack of flow layers, initialised at the exact identity, so the guide starts as
    ``AutoMultivariateNormal``. While the layers are still at the identity they are skipped
    (``warmup``): the guide then *is* ``AutoMultivariateNormal`` at its cost per step, and the flow
    is switched on once the affine part has converged. See the module docstring and
    ``docs/autoflow.md``.

    Arguments:
        model: a Pyro model.
        flow: a family name in ``pyro_flows.FLOWS`` (default :data:`DEFAULT_FLOW`), or a callable
            ``(latent_dim) -> Transform`` (e.g. ``functools.partial(
            pyro.distributions.transforms.affine_autoregressive, hidden_dims=[16])``).
        num_layers: number of flow layers for a family name (default :data:`DEFAULT_NUM_LAYERS`).
        init_loc_fn: per-site initialisation of ``loc`` (default ``init_to_median``).
        init_scale: initial ``scale`` (default 0.1).
        affine: ``"output"`` (default, ``z = loc + L f(eps)``) or ``"base"`` (``z = f(loc + L eps)``).
        affine_rank: ``"full"`` (default: ``L`` lower triangular) or ``"diag"`` (``L = diag(scale)``,
            then the guide starts as ``AutoDiagonalNormal``).
        init: ``"identity"`` (default: every layer's ``init_identity_()``) or ``"default"`` (the
            layers' own initialisation; the flow then trains from the first step).
        warmup: when the flow is switched on: ``"plateau"`` (default: once a
            :class:`PlateauTest` of ``loc`` and ``scale`` passes, or after :data:`DEFAULT_PATIENCE`
            steps), a :class:`PlateauTest` with other
            settings (copied), a number of training steps (guide calls with gradients on), or 0
            (from the first step). Only applies while the
            flow is exactly the identity (``init="identity"``, every layer has an exact identity
            initialisation, and ``affine="output"`` or no permutation), else the flow is on from
            the start.
        laplace: the Laplace start (default ``True``): when the guide builds its parameters it finds the
            mode of the model's log joint (L-BFGS, at most 500 evaluations, or this many if an integer) and
            the curvature there, and if that Gaussian's ELBO estimate beats the default start's
            (``init_loc_fn``, ``init_scale``; 64 common draws each) the guide starts at it and trains in
            its frame: ``z = frame_loc + frame_tril (loc + L f(eps))`` with ``loc = 0``, ``L = I`` at
            the start, so learning rates are in units of the posterior's own scales. Refused (the default
            start, ``frame = (0, I)``, is kept) where the search fails or the curvature is not positive
            definite (a funnel), and skipped for subsampled plates, latent dimension above 512, and when
            trained parameters are in the param store. ``laplace_info`` says what happened.
            ``False``: the default start, as ``AutoMultivariateNormal``.
        num_quantile_samples: Monte Carlo draws used by :meth:`median` and :meth:`quantiles`.
        path_gradient: train with the path-derivative ("sticking the landing") gradient once the flow is on:
            ``log q`` of each draw is differentiated with the parameters held fixed, which drops the score
            term, a zero-mean noise that does not vanish at the optimum (:mod:`pyro_flows.infer.path_gradient`;
            measurements in ``docs/autoflow.md``). Costs the flow's other direction once per step (for most
            families a certified solve, warm-started at the draw: 1.7 to 2.1 times the step for the
            default family). ``"auto"`` (default): on under ``Trace_ELBO`` and ``TraceMeanField_ELBO``
            (:data:`~pyro_flows.infer.path_gradient.PATH_GRADIENT_ELBOS`), off elsewhere: under JIT, and under
            importance-weighted objectives (``RenyiELBO``, ``TraceTailAdaptive_ELBO``), for which the estimator is
            biased, and for a guide called outside an ELBO. ``True``: always (``JitTrace_ELBO`` then raises an
            error naming JIT). ``False``: never. The guide's loss value is the same either way.
        **flow_kwargs: passed to :func:`pyro_flows.flow` for a family name (e.g. ``hidden_dims``: for the default
            family and the others in :data:`WIDTH_RULE_FAMILIES` the default is
            ``[min(max(2 D, 64), 10 D)] * 2``, for the rest the family's own;
            ``cache_size``). ``single_pass`` defaults to ``"sample"`` here: a guide draws
            (``rsample``) and scores its own draws, so that direction is the single-pass one.

    Attributes:
        flow_on: whether the flow layers are in use (``False`` during the warmup).
        flow_lr_scale: the multiplier of :data:`DEFAULT_FLOW_LR` that :meth:`optimizer` gives this guide's flow
            (``FLOW_LR_WIDTH / width`` for the width rule's conditioners narrower than 64, else 1).
        laplace_info: the Laplace start's diagnostics (``accepted``, ``elbo_laplace``, ``elbo_default``,
            ``evals``, ``seconds``, ``reason`` when refused), or None (``laplace=False``).
        frame_loc, frame_tril: the fixed frame of the affine part (no gradient reaches them; saved and loaded
            with the other parameters).

    Under ``JitTrace_ELBO`` the flow is on from the first step (a trace replays the graph it recorded,
    so no warmup can switch it later), and every family with a single-pass sampling direction trains; a family
    whose sampling needs an iterative solve (monotone) raises a :class:`~pyro_flows.solvers.SolverError`
    naming JIT (a trace would freeze the solver's iteration count): use ``Trace_ELBO`` for it.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> pyro.clear_param_store()
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.).to_event(1))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.).to_event(1), obs=y)
        >>> guide = AutoFlow(model)  # the default family; or AutoFlow(model, "qlf", num_layers=2)
        >>> svi = SVI(model, guide, AutoFlow.optimizer(), Trace_ELBO())
        >>> loss = svi.step(torch.randn(10, 2))
        >>> guide.median(torch.randn(10, 2))["mu"].shape
        torch.Size([2])
    """

    def __init__(self, model, flow=None, num_layers: int | None = None, *, init_loc_fn=init_to_median,
                 init_scale: float = 0.1, affine: str = "output", affine_rank: str = "full",
                 init: str = "identity", warmup="plateau", laplace=True, num_quantile_samples: int = 4000,
                 path_gradient="auto", **flow_kwargs):
        self._default_hidden = "hidden_dims" not in flow_kwargs and (flow is None or flow in WIDTH_RULE_FAMILIES)
        if flow is None:
            flow = DEFAULT_FLOW
            for key, value in DEFAULT_FLOW_KWARGS.items():
                flow_kwargs.setdefault(key, value)
        if num_layers is None:
            num_layers = DEFAULT_NUM_LAYERS
        if isinstance(flow, str):
            get_flow(flow)
        elif not callable(flow):
            raise ValueError(f"flow must be a family name or a callable, got {type(flow).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if affine not in _AFFINE:
            raise ValueError(f"affine must be one of {_AFFINE}, got {affine!r}")
        if affine_rank not in _AFFINE_RANK:
            raise ValueError(f"affine_rank must be one of {_AFFINE_RANK}, got {affine_rank!r}")
        if init not in _INIT:
            raise ValueError(f"init must be one of {_INIT}, got {init!r}")
        if not (warmup == "plateau" or isinstance(warmup, PlateauTest) or (
                isinstance(warmup, numbers.Integral) and not isinstance(warmup, bool) and warmup >= 0)):
            raise ValueError(f"warmup must be 'plateau', a PlateauTest or a number of steps >= 0, got {warmup!r}")
        if not (isinstance(laplace, bool) or (isinstance(laplace, numbers.Integral) and laplace > 0)):
            raise ValueError(f"laplace must be True, False or a positive number of evaluations, got {laplace!r}")
        if not isinstance(num_quantile_samples, numbers.Integral) or num_quantile_samples < 2:
            raise ValueError(f"num_quantile_samples must be an integer >= 2, got {num_quantile_samples!r}")
        if not (isinstance(path_gradient, bool) or path_gradient == "auto"):
            raise ValueError(f"path_gradient must be True, False or 'auto', got {path_gradient!r}")
        self._flow_spec = flow
        self._num_layers = int(num_layers)
        self._flow_kwargs = dict(flow_kwargs)
        if isinstance(flow, str):
            self._flow_kwargs.setdefault("single_pass", "sample")
        self._init_scale = float(init_scale)
        self._affine = affine
        self._affine_rank = affine_rank
        self._init = init
        self._warmup = warmup
        self._laplace = laplace
        self.laplace_info = None
        self.num_quantile_samples = int(num_quantile_samples)
        self.path_gradient = path_gradient
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._user_model = model  # unwrapped by Pyro's init_loc_fn handler (for the Laplace start)
        self.transform = None
        self.flow_lr_scale = 1.0
        self.flow_on = True
        self._plateau = None
        self._steps = 0

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        init_loc = self._init_loc().detach()
        frame_loc, frame_tril = torch.zeros_like(init_loc), eye_like(init_loc, self.latent_dim)
        loc, scale = init_loc.clone(), torch.full_like(init_loc, self._init_scale)
        start = self._laplace_start(init_loc, args, kwargs)
        if start is not None and start.accepted:
            # train in the Laplace frame: z = frame_loc + frame_tril (loc + L f(eps)) with loc = 0, L = I
            frame_loc, frame_tril = start.loc, start.scale_tril
            loc, scale = torch.zeros_like(init_loc), torch.ones_like(init_loc)
        # the frame is fixed (no gradient reaches it: it is read detached); parameters, so that the param
        # store and state_dict save and restore it with the coordinates that are relative to it
        self.frame_loc = torch.nn.Parameter(frame_loc)
        self.frame_tril = torch.nn.Parameter(frame_tril)
        self.loc = torch.nn.Parameter(loc)
        self.scale = PyroParam(scale, constraint=constraints.softplus_positive)
        if self._affine_rank == "full":
            self.scale_tril = PyroParam(eye_like(init_loc, self.latent_dim),
                                        constraint=constraints.unit_lower_cholesky)
        # build on the model's device (no allocation on the default device), then cast the dtype
        with torch.device(init_loc.device):
            kwargs = dict(self._flow_kwargs)
            self.flow_lr_scale = 1.0
            if self._default_hidden:
                d = self.latent_dim
                width = min(max(DEFAULT_HIDDEN_FACTOR * d, DEFAULT_MIN_HIDDEN), MAX_HIDDEN_FACTOR * d)
                kwargs["hidden_dims"] = [width] * 2
                self.flow_lr_scale = max(FLOW_LR_WIDTH / width, 1.0)
            module = make_flow(self._flow_spec, self.latent_dim, self._num_layers, **kwargs)
        at_identity = False
        if isinstance(module, torch.nn.Module):
            module = module.to(device=init_loc.device, dtype=init_loc.dtype)
            if self._init == "identity":
                at_identity = init_identity(module)
            # trained tensors loaded from the store: the flow is not at the identity
            at_identity = not _load_from_param_store(self._pyro_get_fullname("transform"), module) and at_identity
            for p in module.parameters():  # the tensors the param store holds now: optim_args reads this
                setattr(p, _FLOW_LR_SCALE, self.flow_lr_scale)
        self.transform = module
        skippable = at_identity and (self._affine == "output" or not _has_permutation(module))
        self.flow_on = not (skippable and self._warmup != 0)
        self._plateau = None
        if isinstance(self._warmup, PlateauTest):
            self._plateau = copy.deepcopy(self._warmup)
        elif self._warmup == "plateau":
            self._plateau = PlateauTest(patience=DEFAULT_PATIENCE)
        self._steps = 0

    def _laplace_start(self, init_loc, args, kwargs):
        """:func:`~pyro_flows.infer.laplace.laplace_start` for this model, or None where it does not apply
        (switched off, trained parameters in the param store, subsampled plates: the log joint is then
        random). Its diagnostics are kept in ``self.laplace_info``."""
        from .laplace import (DEFAULT_MAX_EVALS, conditioned_trace, is_subsampled, laplace_start,
                              unconstrained_log_joint)

        self.laplace_info = None
        if self._laplace is False:
            return None
        if self._pyro_get_fullname("loc") in pyro.get_param_store():
            self.laplace_info = {"reason": "trained parameters in the param store"}
            return None
        try:
            with torch.no_grad():
                trace, _ = conditioned_trace(self, self._user_model, init_loc, args, kwargs)
        except (RuntimeError, ValueError) as exc:  # the model at its initial point: the default start then
            self.laplace_info = {"reason": f"{type(exc).__name__}: {str(exc)[:100]}"}
            return None
        if is_subsampled(trace):
            self.laplace_info = {"reason": "subsampled plates (the log joint is random)"}
            return None
        max_evals = DEFAULT_MAX_EVALS if self._laplace is True else int(self._laplace)
        start = laplace_start(unconstrained_log_joint(self, self._user_model, args, kwargs), init_loc, self._init_scale,
                              max_evals=max_evals, diagonal=self._affine_rank == "diag")
        self.laplace_info = {"accepted": start.accepted, **start.info}
        return start

    def _frame(self):
        """The fixed frame ``(frame_loc, frame_tril)``, detached."""
        return self.frame_loc.detach(), self.frame_tril.detach()

    def _loc_tril(self):
        """The affine part in the model's unconstrained coordinates: ``(loc, L)``; ``L`` is lower
        triangular (a vector of scales for ``affine_rank="diag"``)."""
        frame_loc, frame_tril = self._frame()
        if self._affine_rank == "full":
            return (frame_loc + frame_tril @ self.loc,
                    frame_tril @ (self.scale[..., None] * self.scale_tril))
        frame_scale = frame_tril.diagonal()
        return frame_loc + frame_scale * self.loc, frame_scale * self.scale

    def _flow(self):
        """The flow module without registering it (``self.transform`` registers its parameters)."""
        return self._modules.get("transform", self.__dict__.get("transform"))

    def _advance_warmup(self):
        """Count a training step of the warmup and switch the flow on when its rule says so."""
        if self.flow_on or not (torch.is_grad_enabled() and self.loc.requires_grad):
            return
        if torch.jit.is_tracing():
            # a JIT trace replays the graph it recorded, without this method: it must record the flow
            self.flow_on = True
            return
        self._steps += 1
        if self._plateau is not None:
            # location and scales: the directions the ELBO converges slowest in
            self.flow_on = self._plateau.update(self.loc, self.scale)
        else:
            self.flow_on = self._steps > self._warmup

    def get_base_dist(self):
        return dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)

    def _affine_transform(self, detach: bool = False):
        # cache_size=1: log_prob(z) of a fresh sample z then reads every layer's input back from the
        # caches instead of inverting the flow numerically
        loc, tril = self._loc_tril()
        if detach:
            loc, tril = loc.detach(), tril.detach()
        if self._affine_rank == "full":
            return _LowerCholeskyAffine(loc, tril, cache_size=1)
        return _AffineTransform(loc, tril, event_dim=1, cache_size=1)

    @staticmethod
    def optim_args(lr: float = DEFAULT_LR, flow_lr: float | None = None, clip: float | None = None,
                   schedule: bool = False, **extra):
        """Per-parameter arguments for a Pyro optimiser: ``lr`` for the affine part (``loc``,
        ``scale``, ``scale_tril``), ``flow_lr`` for the flow's networks (default: :data:`DEFAULT_FLOW_LR`
        times the guide's ``flow_lr_scale``, which is ``FLOW_LR_WIDTH / width`` for the width rule's
        conditioners narrower than 64, else 1; a number given is used as it is).

        The affine part must travel far (to the posterior's location and scale) while the flow's
        networks, with thousands of weights, change the map a lot per Adam step: in the posteriordb
        benchmark one learning rate of 0.02 for everything made some families' maps blow up within
        ~100 steps. ``clip`` (for ``pyro.optim.ClippedAdam``, which clamps every gradient element
        to ``[-clip, clip]``) applies to the flow only; the affine part is not clipped, so that it
        follows ``Adam(lr)`` exactly as ``AutoMultivariateNormal`` would. ``schedule=True`` adds
        :class:`~pyro_flows.infer.schedule.PlateauAdamOptimizer`'s per-parameter statistic (``reduce``:
        ``"max"`` for ``loc`` and ``scale``, ``"mean"`` for ``scale_tril`` and the flow). ``**extra`` goes
        to every parameter (e.g. ``lrd``, or ``factor`` / ``min_lr_ratio`` with ``schedule``). The default
        rates are :meth:`optimizer`'s (``DEFAULT_LR``, ``DEFAULT_FLOW_LR``). Use as
        ``pyro.optim.Adam(AutoFlow.optim_args())``, or take :meth:`optimizer`. The names are those of
        ``AutoMultivariateNormal`` too, so the same arguments serve it.
        """
        def args(module_name, param_name):
            if module_name.split(".")[-1] == "transform":
                rate = flow_lr if flow_lr is not None else DEFAULT_FLOW_LR * flow_lr_scale(module_name, param_name)
                out = {"lr": rate, **({} if clip is None else {"clip_norm": clip})}
                reduce = "mean"
            else:
                out = {"lr": lr, **({} if clip is None else {"clip_norm": math.inf})}
                reduce = "mean" if param_name.split(".")[-1] == "scale_tril" else "max"
            return {**out, **({"reduce": reduce} if schedule else {}), **extra}

        return args

    @staticmethod
    def optimizer(lr: float = DEFAULT_LR, flow_lr: float | None = None, clip: float = DEFAULT_CLIP,
                  schedule: bool = True, **extra):
        """The recommended optimiser: :func:`~pyro_flows.infer.PlateauAdam` (Pyro's ``ClippedAdam`` whose
        rate halves each time a parameter is stationary, down to 1/100 of its initial rate) with
        :meth:`optim_args`.

        Arguments:
            lr: the affine part's learning rate (default 0.02, as for ``AutoMultivariateNormal``).
            flow_lr: the flow's learning rate (default: :data:`DEFAULT_FLOW_LR` = 0.002, the rate for
                conditioners of width 64, scaled up to ``0.002 * 64 / width`` for the narrower ones the
                width rule gives at ``D < 7``; read per parameter when Pyro builds its optimiser, i.e. at
                the first step).
            clip: elementwise gradient clamp of the flow's parameters (the affine part is not
                clipped).
            schedule: ``False`` for a constant-rate ``pyro.optim.ClippedAdam`` instead.
            **extra: more arguments for every parameter (e.g. ``lrd``; with the schedule ``factor``,
                ``min_lr_ratio``, ``window``, ``threshold``, ``check_every``).

        Example:
            >>> optim = AutoFlow.optimizer()  # pass to SVI(model, guide, optim, Trace_ELBO())
        """
        args = AutoFlow.optim_args(lr, flow_lr, clip=clip, schedule=schedule, **extra)
        if not schedule:
            return pyro.optim.ClippedAdam(args)
        from .schedule import PlateauAdam

        return PlateauAdam(args)

    def get_transform(self, *args, **kwargs):
        if not self.flow_on:
            return self._affine_transform()
        return ComposeTransform(self._transforms(), cache_size=1)

    def _transforms(self):
        affine = self._affine_transform()
        if self._affine == "output":
            return [self.transform, affine]
        return [affine, self.transform]

    def get_posterior(self, *args, **kwargs):
        self._advance_warmup()
        if not self.flow_on:
            # the flow is the identity: exactly AutoMultivariateNormal (AutoDiagonalNormal), at its cost
            loc, tril = self._loc_tril()
            if self._affine_rank == "full":
                return dist.MultivariateNormal(loc, scale_tril=tril)
            return dist.Normal(loc, tril).to_event(1)
        # one guide call = one step: caches from a previous step may hold stale graphs
        clear_transform_cache(self._flow())
        # a list, not a ComposeTransform, so TransformedDistribution.log_prob walks the cached layers
        if torch.is_grad_enabled() and (self.path_gradient is True or (
                self.path_gradient == "auto" and in_path_gradient_elbo())):
            return PathGradientPosterior(self.get_base_dist(), self._transforms(), self._frozen_log_prob)
        return dist.TransformedDistribution(self.get_base_dist(), self._transforms())

    def _frozen_log_prob(self, z):
        """``log q(z)`` with every parameter held fixed, differentiable in ``z`` (``path_gradient``)."""
        flow, affine = self._flow(), self._affine_transform(detach=True)
        transforms = [flow, affine] if self._affine == "output" else [affine, flow]
        return frozen_log_prob(flow, transforms, self.get_base_dist(), z)

    @torch.no_grad()
    def quantiles(self, quantiles, *args, num_samples: int | None = None, **kwargs):
        """Monte Carlo marginal quantiles of every latent, in the constrained space.

        Arguments:
            quantiles: a list (or tensor) of levels in (0, 1).
            num_samples: draws to use (default ``self.num_quantile_samples``).

        Returns:
            a dict site name -> tensor of shape ``(len(quantiles),) + site_shape``.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        num_samples = self.num_quantile_samples if num_samples is None else int(num_samples)
        q = torch.as_tensor(quantiles, dtype=self.loc.dtype, device=self.loc.device)
        if q.dim() != 1 or not bool(((q > 0) & (q < 1)).all()):
            raise ValueError(f"quantiles must be a 1-D list of levels in (0, 1), got {quantiles!r}")
        latent = self.get_posterior(*args, **kwargs).sample((num_samples,))
        clear_transform_cache(self._flow())
        # the draws' dimension must sit left of every plate dimension (as for vectorised particles)
        depth = max([-f.dim for stack in self._cond_indep_stacks.values() for f in stack
                     if f.vectorized and f.dim is not None] + [0])
        latent = latent.reshape((num_samples,) + (1,) * depth + (self.latent_dim,))
        result = {}
        for site, unconstrained in self._unpack_latent(latent):
            value = biject_to(site["fn"].support)(unconstrained).reshape((num_samples,) + site["value"].shape)
            result[site["name"]] = torch.quantile(value, q, dim=0)
        return result

    @torch.no_grad()
    def median(self, *args, num_samples: int | None = None, **kwargs):
        """Monte Carlo marginal median of every latent (see :meth:`quantiles`)."""
        q = self.quantiles([0.5], *args, num_samples=num_samples, **kwargs)
        return {k: v[0] for k, v in q.items()}
