"""Every core layer: a numerical gradient check and a known value."""
import numpy as np
import pytest
from helpers import assert_close

from mlp.gradcheck import check_layer
from mlp.layers import GELU, Dropout, Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Tanh, layer_from_spec

pytestmark = pytest.mark.numerics     # gradients checked in float64 round differently per BLAS kernel


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("make_layer, shape", [
    (lambda r: Linear(5, 3, rng=r), (4, 5)),
    (lambda r: Linear(12, 4, init="xavier", rng=r), (3, 2, 3, 2)),
    (lambda r: ReLU(), (4, 6)),
    (lambda r: GELU(), (4, 6)),
    (lambda r: GELU(), (3, 4, 5, 5)),
    (lambda r: LeakyReLU(0.2), (4, 6)),
    (lambda r: Tanh(), (4, 6)),
    (lambda r: Sigmoid(), (4, 6)),
    (lambda r: Flatten(), (2, 3, 2, 2)),
])
def test_layer_gradients_match_numerical_below_1e7(rng, make_layer, shape):
    layer = make_layer(rng)
    errors = check_layer(layer, rng.standard_normal(shape), rng)
    assert max(errors.values()) < 1e-7, errors


def test_dropout_gradient_matches_numerical_with_a_fixed_mask(rng):
    def reseed(layer):
        layer.rng = np.random.default_rng(5)
    errors = check_layer(Dropout(0.4), rng.standard_normal((6, 5)), rng, reseed)
    assert errors["x"] < 1e-7


def test_linear_is_x_times_w_plus_b_and_flattens_row_major():
    layer = Linear(6, 2)
    layer.params["W"][...] = np.arange(12.0).reshape(6, 2)   # columns 0,2,..,10 and 1,3,..,11
    layer.params["b"][...] = [1.0, -1.0]
    x = np.zeros((2, 3, 2))
    x[0] = 1.0                     # every input: the column sums 30 and 36
    x[1, 2, 1] = 1.0               # the last input alone (row-major index 5): row 5 of W, [10, 11]
    np.testing.assert_array_equal(layer.forward(x, train=True), [[31.0, 35.0], [11.0, 10.0]])
    dx = layer.backward(np.ones((2, 2)))
    # each input's gradient is its row sum of W; each weight's, the inputs that reached it
    np.testing.assert_array_equal(dx, np.tile([[1.0, 5.0], [9.0, 13.0], [17.0, 21.0]], (2, 1, 1)))
    np.testing.assert_array_equal(layer.grads["W"], [[1, 1]] * 5 + [[2, 2]])
    np.testing.assert_array_equal(layer.grads["b"], [2.0, 2.0])


def test_relu_routes_gradient_only_where_input_was_positive():
    relu = ReLU()
    x = np.linspace(-1, 1, 5)[None]
    np.testing.assert_array_equal(relu.forward(x), [[0, 0, 0, 0.5, 1]])
    np.testing.assert_array_equal(relu.backward(np.full((1, 5), 2.0)), [[0, 0, 0, 2, 2]])


def test_leaky_relu_scales_negatives_by_alpha():
    layer = LeakyReLU(0.1)
    np.testing.assert_allclose(layer.forward(np.array([[-2.0, 3.0]])), [[-0.2, 3.0]])
    np.testing.assert_allclose(layer.backward(np.ones((1, 2))), [[0.1, 1.0]])


def test_sigmoid_and_tanh_known_values_and_no_overflow():
    s, t = Sigmoid(), Tanh()
    x = np.array([[0.0, 1000.0, -1000.0]])
    np.testing.assert_allclose(s.forward(x), [[0.5, 1.0, 0.0]])
    np.testing.assert_allclose(s.backward(np.ones_like(x)), [[0.25, 0.0, 0.0]])
    np.testing.assert_allclose(t.forward(np.array([[0.0]])), [[0.0]])
    np.testing.assert_allclose(t.backward(np.array([[3.0]])), [[3.0]])


def test_dropout_p_is_the_drop_probability_and_eval_is_identity():
    layer = Dropout(0.25, rng=np.random.default_rng(0))
    x = np.ones((200, 500))
    out = layer.forward(x, train=True)
    assert abs(np.mean(out == 0) - 0.25) < 0.01
    assert abs(out.mean() - 1.0) < 0.01          # inverted: expectation preserved
    np.testing.assert_array_equal(np.unique(out), [0.0, 1 / 0.75])
    np.testing.assert_array_equal(layer.forward(x, train=False), x)
    with pytest.raises(ValueError, match="drop probability"):
        Dropout(1.0)


def test_flatten_round_trips_shape():
    layer = Flatten()
    x = np.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(layer.forward(x), x.reshape(2, 12))
    assert layer.backward(np.ones((2, 12))).shape == (2, 3, 4)


def test_layer_from_spec_rebuilds_each_layer_and_refuses_unknown_types():
    for layer in (Linear(3, 2, init="xavier"), LeakyReLU(0.3), Dropout(0.1), Tanh()):
        rebuilt = layer_from_spec(layer.spec())
        assert rebuilt.spec() == layer.spec()
    with pytest.raises(ValueError, match="unknown layer type"):
        layer_from_spec({"type": "teleport"})


def test_he_and_xavier_init_have_the_documented_std():
    rng = np.random.default_rng(0)
    he = Linear(400, 300, init="he", rng=rng).params["W"]
    xavier = Linear(400, 300, init="xavier", rng=rng).params["W"]
    fixed = Linear(400, 300, init="normal", weight_scale=0.01, rng=rng).params["W"]
    assert he.std() == pytest.approx(np.sqrt(2 / 400), rel=0.02)
    assert xavier.std() == pytest.approx(np.sqrt(2 / 700), rel=0.02)
    assert fixed.std() == pytest.approx(0.01, rel=0.02)


def test_gelu_known_values_tanh_form():
    gelu = GELU()
    x = np.array([[-3.0, -1.0, 0.0, 1.0, 3.0]])
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), by hand: gelu(1) = 0.8411920, gelu(3) = 2.9963627
    np.testing.assert_allclose(gelu.forward(x, train=True),
                               [[-0.0036373, -0.1588080, 0.0, 0.8411920, 2.9963627]], atol=1e-7)
    # d/dx(0) = 1/2 and d/dx(-x) = 1 - d/dx(x); the slope at 3 overshoots 1
    slope = gelu.backward(np.ones_like(x))[0]
    np.testing.assert_allclose(slope[[0, 2, 4]], [-0.0116, 0.5, 1.0116], atol=1e-4)
    np.testing.assert_allclose(slope[[0, 1]], 1 - slope[[4, 3]], atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 5), (4, 6, 9, 9)])
def test_gelu_matches_torch_tanh_approximation(shape):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = (3 * rng.standard_normal(shape)).astype(np.float32)
    dout = rng.standard_normal(shape).astype(np.float32)
    gelu = GELU()
    out = gelu.forward(x, train=True)
    xt = torch.tensor(x, requires_grad=True)
    ot = torch.nn.functional.gelu(xt, approximate="tanh")
    ot.backward(torch.tensor(dout))
    # float32 in another order (1 + tanh(u) cancels in the left tail): scaled to the arrays
    assert_close(out, ot.detach().numpy(), rtol=1e-6)
    assert_close(gelu.backward(dout), xt.grad.numpy(), rtol=2e-6)


def test_gelu_after_an_evaluation_forward_still_has_a_gradient():
    """The fast kernel makes the derivative only in training; a backward after an
    evaluation forward computes it from the input instead."""
    x = np.linspace(-2, 2, 12).reshape(3, 4)
    gelu = GELU()
    gelu.forward(x, train=True)
    expected = gelu.backward(np.ones_like(x))
    gelu.forward(x, train=False)
    np.testing.assert_allclose(gelu.backward(np.ones_like(x)), expected, rtol=1e-12)
