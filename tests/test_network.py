"""The network container: whole-net gradients with L2, save/load, refusing foreign files."""
import numpy as np
import pytest

from mlp.gradcheck import check_network, run_all_checks
from mlp.network import ModelFileError, Network, build_mlp

pytestmark = pytest.mark.numerics     # gradients checked in float64 round differently per BLAS kernel


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "leaky_relu"])
@pytest.mark.parametrize("loss", ["softmax", "svm"])
@pytest.mark.parametrize("reg", [0.0, 0.3])
def test_network_gradient_with_l2_matches_numerical(activation, loss, reg):
    rng = np.random.default_rng(3)
    net = build_mlp(4, [7, 5], 3, activation=activation, loss=loss, reg=reg, seed=1)
    errors = check_network(net, rng.standard_normal((9, 4)), rng.integers(0, 3, size=9))
    assert max(errors.values()) < 1e-7, errors


def test_l2_is_half_reg_sum_of_squared_weights_not_biases():
    net = build_mlp(2, [3], 2, reg=0.1, seed=0)
    for p in net.params.values():
        p[...] = 1.0
    X, y = np.zeros((1, 2)), np.array([0])
    loss, grads = net.loss(X, y)
    weights = 2 * 3 + 3 * 2
    assert loss == pytest.approx(np.log(2) + 0.5 * 0.1 * weights)
    np.testing.assert_allclose(grads["0.linear.W"], 0.1)          # data gradient is zero here
    np.testing.assert_allclose(grads["0.linear.b"], 0.0)


def test_all_builtin_gradchecks_pass():
    results = run_all_checks(seed=0)
    assert all(r.passed for r in results), [(r.name, r.max_rel_error) for r in results if not r.passed]


def test_save_load_round_trip_gives_identical_scores(tmp_path):
    net = build_mlp(2, [8, 8], 3, activation="tanh", dropout=0.2, reg=0.01, seed=4)
    net.metadata["data"] = "spiral"
    net.save(tmp_path / "model.npz")
    loaded = Network.load(tmp_path / "model.npz")
    X = np.random.default_rng(0).standard_normal((5, 2))
    np.testing.assert_array_equal(loaded.scores(X), net.scores(X))
    assert loaded.spec() == net.spec()
    assert loaded.metadata["data"] == "spiral"


def test_load_refuses_files_that_are_not_nnx_models(tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    np.savez(tmp_path / "other.npz", W=np.zeros(3))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for name, pattern in [("text.npz", "not an nnx model"), ("other.npz", "not an nnx model"),
                          ("objects.npy", "not an nnx model"), ("missing.npz", "no such model")]:
        with pytest.raises(ModelFileError, match=pattern):
            Network.load(tmp_path / name)


def test_load_refuses_a_model_with_a_wrong_shaped_parameter(tmp_path):
    net = build_mlp(2, [4], 3)
    net.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        arrays = dict(f)
    arrays["param:0.linear.W"] = np.zeros((5, 5))
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ModelFileError, match="0.linear.W"):
        Network.load(tmp_path / "bad.npz")


def test_predict_in_batches_equals_one_pass():
    net = build_mlp(2, [5], 3, seed=0)
    X = np.random.default_rng(1).standard_normal((50, 2))
    np.testing.assert_array_equal(net.predict(X, batch_size=7), net.predict(X))
