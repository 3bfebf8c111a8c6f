"""Conv layers and convnet specs: numerical gradients, known values, and PyTorch as an oracle."""
import numpy as np
import pytest
from helpers import assert_close, parallel_hand_offs
from torch_twin import torch_twin, twin_grads

from mlp.arch import PRESETS, build_convnet, parse_arch, resolve_arch
from mlp.conv import BatchNorm, Conv2D, MaxPool2D, gradcheck_cases
from mlp.gradcheck import check_layer, check_network, run_all_checks
from mlp.kernels import im2col_tiles
from mlp.layers import Linear, ReLU, layer_from_spec
from mlp.network import Network

# Gradient checks, PyTorch comparisons, blocks and threads: numbers that depend on the
# BLAS kernel and the thread count, repeated under others by .ci/run.
pytestmark = pytest.mark.numerics


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---- numerical gradients (float64) ------------------------------------------------

@pytest.mark.parametrize("index", range(len(gradcheck_cases(np.random.default_rng(0)))))
def test_conv_layer_gradients_match_numerical_below_1e7(index):
    rng = np.random.default_rng(index)
    name, layer, x, reset = gradcheck_cases(rng)[index]
    errors = check_layer(layer, x, rng, reset)
    assert max(errors.values()) < 1e-7, (name, errors)


@pytest.mark.parametrize("stride, padding, shape", [(1, 0, (2, 2, 4, 5)), (2, 2, (1, 2, 7, 5)),
                                                    (3, 1, (2, 1, 7, 4))])
def test_conv_gradients_for_more_strides_and_paddings(rng, stride, padding, shape):
    layer = Conv2D(shape[1], 3, 3, stride, padding, rng=rng, dtype=np.float64)
    errors = check_layer(layer, rng.standard_normal(shape), rng)
    assert max(errors.values()) < 1e-7, errors


def test_nnx_gradcheck_includes_the_conv_layers():
    names = [r.name for r in run_all_checks() if r.kind == "layer"]
    assert any(n.startswith("Conv2D") for n in names) and any(n.startswith("BatchNorm") for n in names)


def test_first_conv_of_a_network_skips_the_input_gradient(rng):
    layer = Conv2D(1, 2, 3, padding=1, rng=rng, dtype=np.float64, input_grad=False)
    layer.forward(rng.standard_normal((2, 1, 4, 4)), train=True)
    assert layer.backward(np.ones((2, 2, 4, 4))) is None
    np.testing.assert_allclose(layer.grads["b"], [32.0, 32.0])


def test_a_network_with_fused_steps_matches_its_numerical_gradient(monkeypatch):
    """Conv + max-pool and batch norm + ReLU as fused steps (a conv of stride 2 and a
    pool after a batch norm stay apart), in several blocks on two threads, in float64."""
    from mlp import parallel
    from mlp.kernels import conv as conv_kernels
    monkeypatch.setattr(parallel, "THREADS", 2)
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 4_000)
    monkeypatch.setattr(im2col_tiles, "BLOCK_BYTES", 4_000)
    monkeypatch.setattr(conv_kernels, "MIN_FUSED_BLOCK_BYTES", 0)
    monkeypatch.delenv("NNX_FUSION", raising=False)
    net = build_convnet("conv4x3-pool2-bn-conv6x3-pool2-bn-conv5x2s2-fc3", (2, 9, 9), 3, seed=2,
                        dtype=np.float64, reg=1e-3)
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((6, 2, 9, 9)), rng.integers(0, 3, 6)
    errors = check_network(net, X, y)
    # A conv bias before a batch norm has no gradient (the mean is taken off): its
    # relative error compares rounding noise with rounding noise.
    before_bn = {"0.conv2d.b", "4.conv2d.b"}
    assert max(e for name, e in errors.items() if name not in before_bn) < 1e-6, errors
    assert all(np.abs(net.grads[name]).max() < 1e-12 for name in before_bn)
    fused = [type(layer).__name__ for layer, fused in net._steps if fused]
    assert fused == ["Conv2D", "BatchNorm", "Conv2D", "BatchNorm"], net._steps


def test_a_conv_max_pool_and_relu_as_one_step_match_their_numerical_gradient(monkeypatch):
    """A ReLU after a conv's fused max-pool is taken into the step (no pass of its own):
    float64 gradients through it, for im2col and im2col2 (whose tiles go to the pool)."""
    from mlp import parallel
    from mlp.kernels import conv as conv_kernels
    monkeypatch.setattr(parallel, "THREADS", 2)
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 4_000)
    monkeypatch.setattr(im2col_tiles, "BLOCK_BYTES", 4_000)
    monkeypatch.setattr(conv_kernels, "MIN_FUSED_BLOCK_BYTES", 0)
    monkeypatch.delenv("NNX_FUSION", raising=False)
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((5, 2, 9, 9)), rng.integers(0, 3, 5)
    for algorithm in ("im2col", "im2col2"):
        monkeypatch.setenv("NNX_CONV_ALGORITHM", algorithm)
        net = build_convnet("conv4x3-pool2-fc3", (2, 9, 9), 3, seed=2, dtype=np.float64, reg=1e-3)
        errors = check_network(net, X, y)
        assert max(errors.values()) < 1e-6, (algorithm, errors)
        assert [(type(layer).__name__, fused) for layer, fused in net._steps] == \
            [("Conv2D", True), ("Linear", False)], net._steps


def test_fusion_changes_no_number_and_runs_in_training_only(monkeypatch):
    """NNX_FUSION=off runs every layer alone: the same loss and gradients, bit for bit;
    evaluation and the reference kernels never fuse; a bad value is named and ignored."""
    from mlp import parallel
    from mlp.kernels import conv as conv_kernels
    monkeypatch.setattr(parallel, "THREADS", 2)
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 50_000)
    monkeypatch.setattr(im2col_tiles, "BLOCK_BYTES", 50_000)
    monkeypatch.setattr(conv_kernels, "MIN_FUSED_BLOCK_BYTES", 0)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((16, 3, 16, 16)).astype(np.float32), rng.integers(0, 10, 16)

    def step(fusion):
        monkeypatch.setenv("NNX_FUSION", fusion)
        net = build_convnet("conv8x3-pool2-bn-conv16x3-bn-conv16x3-pool2-fc10", (3, 16, 16), 10, seed=0)
        loss, grads = net.loss(X, y)
        return net, loss, {name: g.copy() for name, g in grads.items()}

    net, loss, grads = step("on")
    assert sum(fused for _, fused in net._steps) == 4
    off, off_loss, off_grads = step("off")
    assert not any(fused for _, fused in off._steps)
    assert loss == off_loss
    for name, grad in grads.items():
        np.testing.assert_array_equal(grad, off_grads[name], err_msg=name)
    net.forward(X, train=False)
    assert not any(fused for _, fused in net._steps)
    monkeypatch.setenv("NNX_FUSION", "on")
    monkeypatch.setenv("NNX_KERNELS", "reference")
    net.forward(X, train=True)
    assert not any(fused for _, fused in net._steps)
    monkeypatch.delenv("NNX_KERNELS")
    monkeypatch.setenv("NNX_FUSION", "sometimes")
    with pytest.warns(UserWarning, match="NNX_FUSION='sometimes'"):
        net.forward(X, train=True)
    assert any(fused for _, fused in net._steps)


def test_a_conv_whose_blocks_are_small_runs_apart_from_its_pool(monkeypatch):
    """A conv fuses its max-pool only when each block of its output is at least
    MIN_FUSED_BLOCK_BYTES (the pool's calls per block cost more than the cache saves
    on small blocks); the batch norm's activation fuses whatever the size."""
    from mlp.kernels import conv as conv_kernels
    net = build_convnet("conv8x3-pool2-bn-fc10", (3, 16, 16), 10)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    block = 4 * 16 * 16 * 8 * 4          # the whole batch is one block of the conv's output
    monkeypatch.setattr(conv_kernels, "MIN_FUSED_BLOCK_BYTES", block + 1)
    net.forward(x, train=True)
    assert [type(layer).__name__ for layer, fused in net._steps if fused] == ["BatchNorm"]
    monkeypatch.setattr(conv_kernels, "MIN_FUSED_BLOCK_BYTES", block)
    net.forward(x, train=True)
    assert [type(layer).__name__ for layer, fused in net._steps if fused] == ["Conv2D", "BatchNorm"]


def test_backward_before_any_forward_is_refused():
    net = build_convnet("conv4x3-pool2-fc3", (1, 6, 6), 3)
    with pytest.raises(RuntimeError, match="forward first"):
        net.backward(np.zeros((2, 3), np.float32))


# ---- known values -------------------------------------------------------------------

def test_conv_by_hand_sums_each_window_times_the_kernel():
    layer = Conv2D(1, 1, 2, dtype=np.float64)
    layer.params["W"][...] = np.array([[1.0, 2.0], [3.0, 4.0]])
    layer.params["b"][...] = 0.5
    x = np.arange(9.0).reshape(1, 1, 3, 3)       # [[0 1 2] [3 4 5] [6 7 8]]
    out = layer.forward(x)
    # top-left window [[0 1] [3 4]]: 0*1 + 1*2 + 3*3 + 4*4 + 0.5 = 27.5, then +10 per step right
    # (the window sum grows by 1+2+3+4) and +30 per step down.
    np.testing.assert_allclose(out, [[[[27.5, 37.5], [57.5, 67.5]]]])
    dx = layer.backward(np.ones_like(out))
    # each input gets the sum of the kernel entries that touch it
    np.testing.assert_allclose(dx[0, 0], [[1, 3, 2], [4, 10, 6], [3, 7, 4]])
    np.testing.assert_allclose(layer.grads["W"][0, 0], [[8, 12], [20, 24]])


def test_conv_padding_is_zeros_and_stride_skips_positions():
    layer = Conv2D(1, 1, 3, stride=2, padding=1, dtype=np.float64)
    layer.params["W"][...] = 1.0
    out = layer.forward(np.ones((1, 1, 5, 5)))
    np.testing.assert_allclose(out[0, 0], [[4, 6, 4], [6, 9, 6], [4, 6, 4]])


def test_conv_refuses_sizes_that_do_not_divide():
    layer = Conv2D(3, 4, 3, stride=2)
    with pytest.raises(ValueError, match=r"size 32 - kernel 3 .* stride 2"):
        layer.output_shape((3, 32, 32))
    with pytest.raises(ValueError, match="does not tile"):
        layer.forward(np.zeros((1, 3, 8, 7), np.float32))
    assert layer.output_shape((3, 33, 31)) == (4, 16, 15)


def test_maxpool_routes_the_gradient_to_the_max_only():
    x = np.array([[1.0, 5.0, 2.0, 0.0],
                  [3.0, 4.0, 7.0, 6.0]]).reshape(1, 1, 2, 4)
    pool = MaxPool2D(2)
    np.testing.assert_array_equal(pool.forward(x), [[[[5.0, 7.0]]]])
    dx = pool.backward(np.array([[[[10.0, 20.0]]]]))
    np.testing.assert_array_equal(dx[0, 0], [[0, 10, 0, 0], [0, 0, 20, 0]])


def test_maxpool_tie_routes_to_exactly_one_winner_the_first():
    pool = MaxPool2D(2)
    pool.forward(np.zeros((1, 1, 2, 2)))
    np.testing.assert_array_equal(pool.backward(np.ones((1, 1, 1, 1)))[0, 0], [[1, 0], [0, 0]])


def test_maxpool_floor_mode_drops_uncovered_rows_and_gets_no_gradient_there():
    pool = MaxPool2D(2)
    x = np.arange(15.0).reshape(1, 1, 3, 5)
    np.testing.assert_array_equal(pool.forward(x), [[[[6.0, 8.0]]]])
    dx = pool.backward(np.ones((1, 1, 1, 2)))
    assert dx.sum() == 2 and dx[0, 0, 1, 1] == 1 and dx[0, 0, 1, 3] == 1


def test_batchnorm_train_normalizes_and_eval_uses_running_stats():
    bn = BatchNorm(2, decay=0.9, dtype=np.float64)
    x = np.array([[1.0, 10.0], [3.0, 20.0], [5.0, 30.0]])
    out = bn.forward(x, train=True)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=0), 1 / (1 + 1e-5 / x.var(axis=0)), rtol=1e-9)
    # running = 0.9 * running + 0.1 * batch, unbiased variance (4 and 100 here)
    np.testing.assert_allclose(bn.buffers["running_mean"], [0.3, 2.0])
    np.testing.assert_allclose(bn.buffers["running_var"], [0.9 + 0.4, 0.9 + 10.0])
    np.testing.assert_allclose(bn.forward(x, train=False),
                               (x - [0.3, 2.0]) / np.sqrt(np.array([1.3, 10.9]) + 1e-5))


def test_layers_rebuild_from_their_spec():
    for layer in (Conv2D(3, 4, 5, 2, 1, input_grad=False), MaxPool2D(3, 2), BatchNorm(7, decay=0.8)):
        rebuilt = layer_from_spec(layer.spec(), np.float32)
        assert type(rebuilt) is type(layer) and rebuilt.arguments() == layer.arguments()


# ---- architecture specs -------------------------------------------------------------

def test_presets_build_with_the_documented_layers():
    net = build_convnet("convnetjs", (3, 32, 32), 10)
    kinds = [layer.kind for layer in net.layers]
    assert kinds == ["conv2d", "maxpool2d", "relu"] * 3 + ["linear"]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in net.layers if c.kind == "conv2d"] == \
        [(16, 5, 2), (20, 5, 2), (20, 5, 2)]
    assert net.layers[-1].in_features == 20 * 4 * 4 and net.output_shape() == (10,)
    assert net.metadata["arch"] == PRESETS["convnetjs"]
    net = build_convnet("cs231n-3layer", (3, 32, 32), 10)
    assert [layer.kind for layer in net.layers] == ["conv2d", "maxpool2d", "relu", "linear", "relu", "linear"]
    assert net.layers[0].padding == 3 and net.layers[3].in_features == 32 * 16 * 16
    assert net.params["0.conv2d.W"].dtype == np.float32


def test_conv6bn_preset_is_three_conv_pool_bn_blocks():
    net = build_convnet("conv6bn", (3, 32, 32), 10)
    block = ["conv2d", "maxpool2d", "batchnorm", "relu", "conv2d", "batchnorm", "relu"]
    block_then_pool = block[:-1] + ["maxpool2d", "relu"]
    # the last ReLU waits for the global max-pool, which it commutes with
    assert [layer.kind for layer in net.layers] == block * 2 + block_then_pool + ["linear"]
    assert net.layers[-3].kind == "maxpool2d" and net.layers[-3].pool_size == 4

    convs = [layer for layer in net.layers if layer.kind == "conv2d"]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 32, 3, 1), (32, 32, 3, 1), (32, 64, 3, 1), (64, 64, 3, 1), (64, 128, 3, 1), (128, 128, 3, 1)]
    assert net.layers[-1].in_features == 128 and net.output_shape() == (10,)
    assert sum(p.size for p in net.params.values()) == 289_194


def test_spec_parsing_suffixes_and_bn_goes_before_relu():
    assert parse_arch("conv32x3s2p1-pool3s2-dropout0.5-fc7") == [
        ("conv", (32, 3, 2, 1)), ("pool", (3, 2)), ("dropout", (0.5,)), ("fc", (7,))]
    assert resolve_arch("convnetjs") == PRESETS["convnetjs"] and resolve_arch("fc3") == "fc3"
    net = build_convnet("conv4x3-bn-pool2-fc8-bn-tanh", (1, 8, 6), 3)
    assert [layer.kind for layer in net.layers] == [
        "conv2d", "batchnorm", "maxpool2d", "relu", "linear", "batchnorm", "tanh", "linear"]
    assert net.metadata["arch"].endswith("-fc3") and net.output_shape() == (3,)
    net = build_convnet("conv4x3-pool2-bn-conv5x3-dropout0.5-fc3", (1, 8, 6), 3)
    assert [layer.kind for layer in net.layers] == [
        "conv2d", "maxpool2d", "batchnorm", "relu", "conv2d", "relu", "dropout", "linear"]
    net = build_convnet("conv4x3-pool2-bn-gelu-conv5x3-gelu-fc8-gelu-fc3", (1, 8, 6), 3)
    assert [layer.kind for layer in net.layers] == [
        "conv2d", "maxpool2d", "batchnorm", "gelu", "conv2d", "gelu", "linear", "gelu", "linear"]


def test_pooling_before_the_relu_changes_nothing():
    """The automatic ReLU moves after the pool; max commutes with ReLU, so forward
    and gradients equal those of conv-relu-pool."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 8, 8))
    y = np.array([0, 2])
    pooled_first = build_convnet("conv4x3-pool2-fc3", (3, 8, 8), 3, seed=1, dtype=np.float64)
    relu_first = build_convnet("conv4x3-relu-pool2-fc3", (3, 8, 8), 3, seed=1, dtype=np.float64)
    assert [layer.kind for layer in relu_first.layers][:3] == ["conv2d", "relu", "maxpool2d"]
    loss_a, grads_a = pooled_first.loss(x, y)
    loss_b, grads_b = relu_first.loss(x, y)
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    pairs = zip(sorted(grads_a.items()), (grads_b[k] for k in sorted(grads_b)), strict=True)
    for (name_a, g_a), g_b in pairs:
        assert_close(g_a, g_b, rtol=1e-12, err_msg=name_a)


@pytest.mark.parametrize("spec, message", [
    ("conv4x3-blah-fc10", "bad architecture token 'blah'"),
    ("conv4x3-fc7", "fc7, but the data has 10 classes"),
    ("conv4x4s2p0-fc10", "does not tile"),
    ("dropout1.5", "drop probability"),
    ("fc5-conv4x3", "needs \\(C, H, W\\) input"),
])
def test_bad_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(ValueError, match=message):
        build_convnet(spec, (3, 9, 9), 10)


def test_saved_conv_net_loads_with_identical_scores(tmp_path, rng):
    net = build_convnet("conv4x3-bn-pool2-conv6x4s2p1-fc10", (3, 8, 8), 10, seed=3)
    X = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    net.loss(X, rng.integers(0, 10, 5))          # moves the running statistics off their start
    net.save(tmp_path / "conv.npz")
    loaded = Network.load(tmp_path / "conv.npz")
    assert loaded.metadata["arch"] == net.metadata["arch"]
    assert [layer.spec() for layer in loaded.layers] == [layer.spec() for layer in net.layers]
    np.testing.assert_array_equal(loaded.scores(X), net.scores(X))


def test_conv_net_trains_its_loss_down(rng):
    net = build_convnet("conv4x3-pool2-fc3", (1, 6, 6), 3, dtype=np.float64)
    X, y = rng.standard_normal((12, 1, 6, 6)), rng.integers(0, 3, 12)
    first = net.loss(X, y)[0]
    for _ in range(30):
        _, grads = net.loss(X, y)
        for name, p in net.params.items():
            p -= 0.1 * grads[name]
    assert net.loss(X, y)[0] < 0.5 * first


# ---- PyTorch as an oracle (float32) -------------------------------------------------
# PyTorch sums in other orders (its own GEMM, im2col or direct kernels): values agree
# to float32 rounding scaled to each array's magnitude, never entry by entry.
FORWARD, BACKWARD = 1e-5, 1e-4


@pytest.mark.parametrize("shape, f, k, stride, pad", [
    ((4, 3, 8, 8), 5, 3, 1, 1), ((1, 2, 7, 5), 3, 3, 2, 1), ((3, 4, 9, 6), 2, 2, 1, 0),
    ((2, 3, 12, 10), 4, 5, 1, 2), ((1, 1, 6, 10), 3, 4, 2, 1),
])
def test_conv_matches_torch_forward_and_gradients(rng, shape, f, k, stride, pad):
    torch = pytest.importorskip("torch")
    layer = Conv2D(shape[1], f, k, stride, pad, rng=rng)
    layer.params["b"][...] = rng.standard_normal(f)
    x = rng.standard_normal(shape).astype(np.float32)
    out = layer.forward(x, train=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx = layer.backward(dout)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(layer.params["W"], requires_grad=True)
    bt = torch.tensor(layer.params["b"], requires_grad=True)
    ot = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=pad)
    ot.backward(torch.tensor(dout))
    assert_close(out, ot.detach().numpy(), FORWARD, "out")
    assert_close(dx, xt.grad.numpy(), BACKWARD, "dx")
    assert_close(layer.grads["W"], wt.grad.numpy(), BACKWARD, "dW")
    assert_close(layer.grads["b"], bt.grad.numpy(), BACKWARD, "db")


@pytest.mark.parametrize("shape, size, stride", [
    ((2, 3, 8, 8), 2, None), ((1, 2, 7, 9), 3, 2), ((3, 1, 6, 4), 2, 1), ((1, 4, 9, 7), 2, None)])
def test_maxpool_matches_torch(rng, shape, size, stride):
    torch = pytest.importorskip("torch")
    pool = MaxPool2D(size, stride)
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float32)
    out = pool.forward(x, train=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    ot = torch.nn.functional.max_pool2d(xt, size, stride)
    ot.backward(torch.tensor(dout))
    np.testing.assert_array_equal(out, ot.detach().numpy())      # a max is exact
    assert_close(pool.backward(dout), xt.grad.numpy(), BACKWARD)   # overlaps add in any order


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5, 6), (1, 2, 3, 4)])
def test_batchnorm_matches_torch_in_train_and_eval_with_running_stats(rng, shape):
    torch = pytest.importorskip("torch")
    c = shape[1]
    bn = BatchNorm(c, decay=0.9)              # torch momentum 0.1
    bn.params["gamma"][...] = rng.standard_normal(c)
    bn.params["beta"][...] = rng.standard_normal(c)
    rm, rv = torch.zeros(c), torch.ones(c)
    gt = torch.tensor(bn.params["gamma"], requires_grad=True)
    bt = torch.tensor(bn.params["beta"], requires_grad=True)
    for step in range(3):
        x = (3 * rng.standard_normal(shape) + step).astype(np.float32)
        out = bn.forward(x, train=True)
        dout = rng.standard_normal(shape).astype(np.float32)
        dx = bn.backward(dout)
        xt = torch.tensor(x, requires_grad=True)
        gt.grad = bt.grad = None
        ot = torch.nn.functional.batch_norm(xt, rm, rv, gt, bt, training=True, momentum=0.1, eps=1e-5)
        ot.backward(torch.tensor(dout))
        assert_close(out, ot.detach().numpy(), FORWARD, "out")
        assert_close(dx, xt.grad.numpy(), BACKWARD, "dx")
        assert_close(bn.grads["gamma"], gt.grad.numpy(), BACKWARD, "dgamma")
        assert_close(bn.grads["beta"], bt.grad.numpy(), BACKWARD, "dbeta")
        assert_close(bn.buffers["running_mean"], rm.numpy(), FORWARD, "running_mean")
        assert_close(bn.buffers["running_var"], rv.numpy(), FORWARD, "running_var")
    x = rng.standard_normal(shape).astype(np.float32)
    ot = torch.nn.functional.batch_norm(torch.tensor(x), rm, rv, gt, bt, training=False, eps=1e-5)
    assert_close(bn.forward(x, train=False), ot.detach().numpy(), FORWARD, "eval")


@pytest.mark.parametrize("batch", [1, 6])
def test_convnetjs_net_matches_an_equivalent_torch_net(rng, batch):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    net = build_convnet("convnetjs", (3, 32, 32), 10, seed=1)
    for layer in net.layers:
        if "b" in layer.params:
            layer.params["b"][...] = 0.1 * rng.standard_normal(layer.params["b"].shape)
    tnet = nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(20, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(320, 10))
    pairs = list(zip([layer for layer in net.layers if layer.params],
                     [m for m in tnet if isinstance(m, (nn.Conv2d, nn.Linear))], strict=True))
    with torch.no_grad():
        for ours, theirs in pairs:
            w = ours.params["W"]
            theirs.weight.copy_(torch.tensor(w.T if isinstance(ours, Linear) else w))
            theirs.bias.copy_(torch.tensor(ours.params["b"]))
    X = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    loss, _ = net.loss(X, y)
    tloss = nn.functional.cross_entropy(tnet(torch.tensor(X)), torch.tensor(y))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=FORWARD)
    assert_close(net.scores(X), tnet(torch.tensor(X)).detach().numpy(), FORWARD, "scores")
    for ours, theirs in pairs:
        dw = theirs.weight.grad.numpy()
        assert_close(ours.grads["W"], dw.T if isinstance(ours, Linear) else dw, BACKWARD, "dW")
        assert_close(ours.grads["b"], theirs.bias.grad.numpy(), BACKWARD, "db")


def test_relu_keeps_the_conv_output_layout_and_values(rng):
    # layers downstream of a conv get NCHW-shaped views of NHWC memory; values are what count
    conv = Conv2D(2, 3, 3, padding=1, rng=rng)
    x = rng.standard_normal((2, 2, 4, 5)).astype(np.float32)
    out = ReLU().forward(conv.forward(x))
    assert out.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(np.ascontiguousarray(out), np.maximum(conv.forward(x), 0))


@pytest.mark.parametrize("spec", ["conv8x3-pool2-bn-conv16x3-bn-conv16x4s2p1-pool2-fc24-bn-fc10",
                                  "convnetjs"])
def test_a_whole_network_step_matches_its_torch_twin(monkeypatch, spec):
    """Loss and every gradient of one training step, blocks and threads included,
    against the same network in PyTorch."""
    torch = pytest.importorskip("torch")
    from mlp import parallel
    monkeypatch.setattr(parallel, "THREADS", 2)
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 50_000)    # many blocks per layer
    monkeypatch.setattr(im2col_tiles, "BLOCK_BYTES", 50_000)
    handed_off = parallel_hand_offs(monkeypatch)
    rng = np.random.default_rng(0)
    size = 32 if spec == "convnetjs" else 16
    net = build_convnet(spec, (3, size, size), 10, seed=0)
    twin = torch_twin(net, torch)
    x = rng.standard_normal((23, 3, size, size)).astype(np.float32)
    y = rng.integers(0, 10, 23)
    loss, grads = net.loss(x, y)
    assert handed_off, "the step ran in one thread: blocks and threads were not tested"
    twin.train()
    torch_loss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()
    assert loss == pytest.approx(torch_loss.item(), rel=FORWARD)
    expected = twin_grads(net, twin, torch)
    assert expected.keys() == grads.keys()
    for name, grad in grads.items():
        # A layer's gradients are compared as one array (a conv bias before a batch
        # norm gets none: its entries are rounding noise of the size of the layer's).
        layer = name.rsplit(".", 1)[0]
        scale = max(np.abs(g).max() for k, g in expected.items() if k.rsplit(".", 1)[0] == layer)
        assert_close(grad, expected[name], BACKWARD, name, scale=scale)
