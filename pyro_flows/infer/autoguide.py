"""``AutoFlow``: a normalizing-flow autoguide with sensible defaults, and the transform-cache helper.

Construction. For a model whose unconstrained latent vector has size D, :class:`AutoFlow` uses

    z = loc + scale * f(eps),    eps ~ Normal(0, I_D),

where ``f`` is a stack of ``num_layers`` layers of a registered family (``pyro_flows.flow(name, D,
num_layers)``, which puts the family's permutations between layers) or any user transform, and
``loc`` / ``scale`` form a diagonal affine layer whose ``loc`` starts at the model's initial point
(``init_loc_fn``, :func:`~pyro.infer.autoguide.initialization.init_to_median` by default, as for
``AutoNormal``/``AutoMultivariateNormal``) and whose ``scale`` starts at ``init_scale`` (0.1 by
default, softplus-positive). The constrained values are then ``biject_to(support)(z)`` per site,
as in every :class:`~pyro.infer.autoguide.AutoContinuous` guide (plates, constrained latents and
``Predictive`` work as for Pyro's guides).

Choices where the requirements are loose:

* Where the affine layer sits. ``affine="output"`` (default) applies the affine layer *after* the
  flow, so the flow always acts on standardised O(1) coordinates whatever the posterior's location
  and scale are. Flows whose non-linearity is concentrated near the origin (bounded sinusoidal
  terms, splines with linear tails, Lipschitz residual maps) would otherwise see inputs far in
  their linear tails (a posterior centred at 100 with scale 0.01) and could not bend them.
  ``affine="base"`` gives ``z = f(loc + scale * eps)`` (the affine layer directly on the base
  noise) for users who want the literal "affine layer at the base". Both are the identity
  composed with ``Normal(init_loc, init_scale^2)`` when ``f`` is the identity.
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

import numbers
import weakref

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineTransform, ComposeTransform
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from pyro.params import param_with_module_name
from torch.distributions import Transform, biject_to

from ..registry import get_flow
from ..stacking import flow as _stack_flow

__all__ = ["AutoFlow", "clear_transform_cache", "make_flow"]

_AFFINE = ("output", "base")


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


def _load_from_param_store(name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Make ``module`` use the tensors the param store holds under ``name`` (after ``load``).

    Pyro registers a plain ``nn.Module`` inside a guide with ``pyro.module(name, module)``, which
    puts *new* parameters in the store but leaves the module's own tensors in place when the store
    already holds trained ones: after ``pyro.get_param_store().load(...)`` a freshly built guide
    would silently keep its untrained flow. ``update_module_params=True`` swaps the stored tensors
    into the module; a stored tensor of another shape (a different model or flow) is an error.
    """
    store = pyro.get_param_store()
    for pname, p in module.named_parameters():
        key = param_with_module_name(name, pname)
        if key in store and store[key].shape != p.shape:
            raise ValueError(
                f"the param store holds {key!r} with shape {tuple(store[key].shape)}, but the flow "
                f"built here has shape {tuple(p.shape)}; clear the store or build the same flow"
            )
    return pyro.module(name, module, update_module_params=True)


class AutoFlow(AutoContinuous):
    """A normalizing-flow guide over all continuous latents: ``z = loc + scale * f(eps)``.

    See the module docstring for the construction, the defaults and the cache policy.

    Arguments:
        model: a Pyro model.
        flow: a family name in ``pyro_flows.FLOWS``, or a callable ``(latent_dim) -> Transform``
            (e.g. ``functools.partial(pyro.distributions.transforms.affine_autoregressive,
            hidden_dims=[16])``).
        num_layers: number of flow layers for a family name (default 4).
        init_loc_fn: per-site initialisation of ``loc`` (default ``init_to_median``).
        init_scale: initial ``scale`` of the affine layer (default 0.1).
        affine: ``"output"`` (default, affine layer after the flow) or ``"base"`` (on the base
            noise, before the flow).
        num_quantile_samples: Monte Carlo draws used by :meth:`median` and :meth:`quantiles`.
        **flow_kwargs: passed to :func:`pyro_flows.flow` for a family name (e.g. ``hidden_dims``,
            ``cache_size``). ``single_pass`` defaults to ``"sample"`` here: a guide draws
            (``rsample``) and scores its own draws, so that direction is the single-pass one.

    Under ``JitTrace_ELBO`` every family with a single-pass sampling direction trains; a family
    whose sampling needs an iterative solve (monotone) raises a :class:`~pyro_flows.solvers.SolverError`
    naming JIT (a trace would freeze the solver's iteration count): use ``Trace_ELBO`` for it.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.distributions.transforms import affine_autoregressive
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> pyro.clear_param_store()
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.).to_event(1))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.).to_event(1), obs=y)
        >>> guide = AutoFlow(model, affine_autoregressive, init_scale=0.1)  # or AutoFlow(model, "qlf")
        >>> svi = SVI(model, guide, pyro.optim.Adam(AutoFlow.optim_args(0.02, 0.001)), Trace_ELBO())
        >>> loss = svi.step(torch.randn(10, 2))
        >>> guide.median(torch.randn(10, 2))["mu"].shape
        torch.Size([2])
    """

    def __init__(self, model, flow, num_layers: int = 4, *, init_loc_fn=init_to_median,
                 init_scale: float = 0.1, affine: str = "output", num_quantile_samples: int = 4000,
                 **flow_kwargs):
        if isinstance(flow, str):
            get_flow(flow)
        elif not callable(flow):
            raise ValueError(f"flow must be a family name or a callable, got {type(flow).__name__}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        if not isinstance(init_scale, numbers.Real) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if affine not in _AFFINE:
            raise ValueError(f"affine must be one of {_AFFINE}, got {affine!r}")
        if not isinstance(num_quantile_samples, numbers.Integral) or num_quantile_samples < 2:
            raise ValueError(f"num_quantile_samples must be an integer >= 2, got {num_quantile_samples!r}")
        self._flow_spec = flow
        self._num_layers = int(num_layers)
        self._flow_kwargs = dict(flow_kwargs)
        if isinstance(flow, str):
            self._flow_kwargs.setdefault("single_pass", "sample")
        self._init_scale = float(init_scale)
        self._affine = affine
        self.num_quantile_samples = int(num_quantile_samples)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.transform = None

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        init_loc = self._init_loc().detach()
        self.loc = torch.nn.Parameter(init_loc.clone())
        self.scale = PyroParam(torch.full_like(init_loc, self._init_scale),
                               constraint=constraints.softplus_positive)
        # build on the model's device (no allocation on the default device), then cast the dtype
        with torch.device(init_loc.device):
            module = make_flow(self._flow_spec, self.latent_dim, self._num_layers, **self._flow_kwargs)
        if isinstance(module, torch.nn.Module):
            module = module.to(device=init_loc.device, dtype=init_loc.dtype)
            _load_from_param_store(self._pyro_get_fullname("transform"), module)
        self.transform = module

    def get_base_dist(self):
        return dist.Normal(torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)

    @staticmethod
    def optim_args(lr: float = 0.02, flow_lr: float = 0.001, **extra):
        """Per-parameter arguments for a Pyro optimiser: ``lr`` for ``loc``/``scale``, ``flow_lr`` for
        the flow's networks.

        The affine layer must travel far (to the posterior's location and scale) while the flow's
        networks, with thousands of weights, change the map a lot per Adam step: in the posteriordb
        benchmark one learning rate of 0.02 for everything made some families' maps blow up within
        ~100 steps, while 0.02 / 0.001 trained stably. Use as
        ``pyro.optim.Adam(AutoFlow.optim_args(0.02, 0.001))``.
        """
        return lambda module_name, param_name: {
            "lr": flow_lr if module_name.split(".")[-1] == "transform" else lr, **extra}

    def _transforms(self):
        # cache_size=1 on the affine layer: log_prob(z) of a fresh sample z then reads every layer's
        # input back from the caches instead of inverting the flow numerically
        affine = AffineTransform(self.loc, self.scale, event_dim=1, cache_size=1)
        if self._affine == "output":
            return [self.transform, affine]
        return [affine, self.transform]

    def get_transform(self, *args, **kwargs):
        return ComposeTransform(self._transforms(), cache_size=1)

    def get_posterior(self, *args, **kwargs):
        # one guide call = one step: caches from a previous step may hold stale graphs
        clear_transform_cache(self.transform)
        # a list, not a ComposeTransform, so TransformedDistribution.log_prob walks the cached layers
        return dist.TransformedDistribution(self.get_base_dist(), self._transforms())

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
        clear_transform_cache(self.transform)
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
