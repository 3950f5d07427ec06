"""Every tutorial runs end to end in its ``--smoke`` mode (in a subprocess), so the tutorials cannot rot."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = sorted(glob.glob(os.path.join(ROOT, "tutorials", "[0-9]*.py")))


def test_there_are_at_least_three_tutorials():
    assert len(TUTORIALS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=os.path.basename)
def test_tutorial_smoke(path, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, path, "--smoke"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)  # cwd=tmp_path: any default output folder lands there
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "|---|" in r.stdout  # each tutorial ends with a results table


def test_tutorial_exactness_check_is_not_served_by_the_cache():
    """Tutorial 01's "check exactness yourself" must run the inverse: an inverse that is off by 1e-3
    is reported as such (a check on the cached pair would print 0 whatever the inverse does)."""
    import importlib.util

    import torch
    from pyro.distributions.torch_transform import TransformModule

    from pyro_flows.transforms import FlowTransform

    class WrongInverse(FlowTransform, TransformModule):
        def __init__(self):
            super().__init__(2)
            self.shift = torch.nn.Parameter(torch.zeros(2))

        def _call_and_ladj(self, x):
            return x + self.shift, x.new_zeros(x.shape[:-1])

        def _inverse_and_ladj(self, y):
            return y - self.shift + 1e-3, y.new_zeros(y.shape[:-1])

    path = os.path.join(ROOT, "tutorials", "01_density_estimation.py")
    spec = importlib.util.spec_from_file_location("tutorial_01", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the functions; the script body runs under __main__ only
    inv_err, ld_err = module.check_exactness(WrongInverse())
    assert abs(inv_err - 1e-3) < 1e-9, inv_err
    assert ld_err < 1e-12
