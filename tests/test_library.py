"""nnx used from Python, as a library user would: clear errors or documented behaviour."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlp.losses import softmax_cross_entropy
from mlp.network import build_mlp

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", sorted(p.stem for p in (ROOT / "cli").glob("*.py")
                                          if p.stem not in ("__init__", "__main__")))
def test_every_cli_module_imports_on_its_own(module):
    """No import cycle: a fresh interpreter imports any one of them first."""
    done = subprocess.run([sys.executable, "-c", f"import cli.{module}"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_replacing_a_parameter_by_name_is_refused_and_writing_into_it_lands():
    net = build_mlp(2, [4], 3, seed=0)
    with pytest.raises(TypeError, match=r"net.params\['0.linear.W'\]\[...\] = value"):
        net.params["0.linear.W"] = np.zeros((2, 4))
    net.params["0.linear.W"][...] = 7.0
    assert np.all(net.layers[0].params["W"] == 7.0)
    assert dict(net.params).keys() == {"0.linear.W", "0.linear.b", "2.linear.W", "2.linear.b"}


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, 1.5])
def test_label_smoothing_outside_zero_to_one_is_refused(smoothing):
    with pytest.raises(ValueError, match="label_smoothing"):
        softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1]), smoothing)
