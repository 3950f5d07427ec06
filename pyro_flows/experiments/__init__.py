"""The application layer: data splits, one model wrapper (our families and the peers), the trainer,
measurement and reports. The demo, the benchmarks and the tutorials are built from these; the library
(``transforms/``, ``nn/``, ``solvers``, ``infer/``) never imports this package. See ``docs/architecture.md``.

Modules: :mod:`~pyro_flows.experiments.data`, :mod:`~pyro_flows.experiments.models`,
:mod:`~pyro_flows.experiments.trainer`, :mod:`~pyro_flows.experiments.measure`,
:mod:`~pyro_flows.experiments.reports`, :mod:`~pyro_flows.experiments.bench` (``python -m pyro_flows bench``).
"""
