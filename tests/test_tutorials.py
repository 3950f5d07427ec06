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
