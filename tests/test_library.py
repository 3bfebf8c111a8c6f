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


def test_a_layer_made_without_rng_gets_seeded_weights_not_zeros():
    from mlp.conv import Conv2D
    from mlp.layers import Linear
    a, b = Linear(4, 3), Linear(4, 3)
    assert np.any(a.params["W"] != 0) and np.array_equal(a.params["W"], b.params["W"])
    assert np.any(Conv2D(2, 3, 3).params["W"] != 0)


def test_an_input_of_another_dtype_is_refused_not_cast():
    from mlp.conv import BatchNorm, Conv2D
    from mlp.layers import Linear
    conv = Conv2D(2, 3, 3, padding=1)                     # float32, the ConvNet default
    with pytest.raises(TypeError, match="float32 parameters but got a float64 input"):
        conv.forward(np.zeros((1, 2, 4, 4)))
    with pytest.raises(TypeError, match="dtype=np.float32"):
        Linear(3, 2).forward(np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError):
        BatchNorm(2).forward(np.zeros((3, 2)), train=True)


def test_batchnorm_in_training_refuses_a_single_value_per_feature():
    from mlp.conv import BatchNorm
    bn = BatchNorm(3, dtype=np.float64)
    with pytest.raises(ValueError, match="at least two values per feature"):
        bn.forward(np.ones((1, 3)), train=True)
    bn.forward(np.ones((1, 3)), train=False)              # evaluation uses running statistics
    bn.forward(np.ones((1, 3, 2, 2)), train=True)         # one image, four values per channel
