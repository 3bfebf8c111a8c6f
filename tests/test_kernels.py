"""The fast kernels against the plain-NumPy reference layers, on random shapes; the
conv algorithm choice (forced, measured, recorded); the kernel switch."""
import numpy as np
import pytest
from helpers import assert_close

from mlp import parallel, reference
from mlp.conv import BatchNorm, Conv2D, MaxPool2D
from mlp.kernels import batchnorm as batchnorm_kernels
from mlp.kernels import conv as conv_kernels
from mlp.kernels import elementwise, im2col_tiles, winograd
from mlp.kernels import pool as pool_kernels
from mlp.layers import GELU, Linear, ReLU
from mlp.network import ModelFileError, Network

# Tolerances and bit-identity claims that must hold whatever the BLAS kernel: repeated
# under the others by .ci/run.
pytestmark = pytest.mark.numerics

# Different summation orders: tolerances scaled to each array's largest entry.
# Winograd's a = 6 transforms (F(4x4, 3x3) and F(2x2, 5x5), which winograd2 runs on a 5x5
# conv) round more than im2col (they hold 1/24 and 8 or 16), and so do the a = 8 ones of
# F(4x4, 5x5) (winograd4 on a 5x5 conv: 1/90, 21/4 and 8). Measured worst errors against
# float64 on these shapes: im2col 7e-7, F(2x2, 3x3) 6e-7, F(4x4, 3x3) 3e-6 in float32;
# 7e-16, 1e-15, 6e-15 in float64; against the reference in the same dtype, five seeds
# of each shape: F(2x2, 5x5) 5.0e-6 and 9.9e-15, F(4x4, 5x5) 5.1e-6 and 8.4e-15.
RTOL = {("im2col", np.float32): 4e-6, ("winograd2", np.float32): 4e-6, ("winograd4", np.float32): 2e-5,
        ("im2col", np.float64): 1e-14, ("winograd2", np.float64): 1e-14, ("winograd4", np.float64): 5e-14}
RTOL.update({("im2col2", dtype): RTOL["im2col", dtype] for dtype in (np.float32, np.float64)})
WIDE_RTOL = {np.float32: 2e-5, np.float64: 5e-14}   # the a = 6 and a = 8 transforms, whichever the tile


def nhwc_memory(x):
    """x: (N, C, H, W) as an NCHW-shaped view of NHWC memory, as a conv's output is."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Several blocks and two threads even on these small shapes."""
    monkeypatch.setattr(parallel, "THREADS", 2)
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 40_000)
    monkeypatch.setattr(im2col_tiles, "BLOCK_BYTES", 40_000)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_SIZE", 1)
    monkeypatch.setattr(winograd, "BLOCK_BYTES", 40_000)
    monkeypatch.setattr(winograd, "MIN_ROWS", 4)
    monkeypatch.setattr(elementwise, "MIN_PARALLEL_SIZE", 1)     # its own copy of the name
    monkeypatch.setattr(elementwise, "BLOCK_BYTES", 4_000)
    monkeypatch.setattr(pool_kernels, "BLOCK_BYTES", 2_000)    # a fused pool's own steps too
    monkeypatch.setattr(conv_kernels, "MIN_FUSED_BLOCK_BYTES", 0)
    monkeypatch.delenv("NNX_CONV_ALGORITHM", raising=False)
    monkeypatch.delenv("NNX_KERNELS", raising=False)


CONV_SHAPES = [  # (N, C, H, W), F, K, stride, padding
    ((1, 3, 7, 5), 4, 3, 1, 1), ((5, 8, 9, 9), 16, 3, 1, 1), ((3, 16, 6, 11), 8, 3, 1, 0),
    ((2, 5, 8, 8), 3, 3, 1, 2), ((4, 7, 13, 12), 9, 3, 1, 1), ((2, 3, 9, 7), 4, 5, 2, 2),
    ((3, 2, 8, 8), 5, 2, 1, 0), ((2, 4, 3, 3), 5, 3, 1, 0), ((1, 2, 2, 4), 3, 3, 1, 1),
    ((3, 4, 9, 7), 6, 5, 1, 2), ((2, 5, 8, 8), 3, 5, 1, 0), ((2, 3, 5, 6), 4, 5, 1, 4),
    ((1, 2, 3, 3), 2, 5, 1, 3),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, F, K, S, P, algorithm", [
    (*case, algorithm) for case in CONV_SHAPES for algorithm in conv_kernels.ALGORITHMS
    if conv_kernels.applies(algorithm, *case[2:])])
def test_conv_kernels_match_the_reference(shape, F, K, S, P, algorithm, dtype):
    rng = np.random.default_rng(sum(shape) + F)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((F, shape[1], K, K)).astype(dtype)
    b = rng.standard_normal(F).astype(dtype)
    out, cache = conv_kernels.forward(algorithm, nhwc_memory(x), w, b, S, P, {})
    expected, ref_cache = reference.conv_forward(x, w, b, S, P)
    dout = rng.standard_normal(expected.shape).astype(dtype)
    dx, dw, db = conv_kernels.backward(nhwc_memory(dout), cache, input_grad=True)
    ref_dx, ref_dw, ref_db = reference.conv_backward(dout, ref_cache)
    rtol = WIDE_RTOL[dtype] if algorithm.startswith("winograd") and K == 5 else RTOL[algorithm, dtype]
    for name, ours, theirs in (("out", out, expected), ("dx", dx, ref_dx), ("dw", dw, ref_dw),
                               ("db", db, ref_db)):
        assert ours.dtype == dtype, name
        assert_close(ours, theirs, rtol, err_msg=f"{algorithm} {name}")
    assert conv_kernels.backward(nhwc_memory(dout), cache, input_grad=False)[0] is None


def _pooled(shape, F, K, S, P):
    """Whether a 2x2 window fits the conv's output."""
    return (min(shape[2:]) + 2 * P - K) // S + 1 >= 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, F, K, S, P, algorithm", [
    (*case, algorithm) for case in CONV_SHAPES for algorithm in conv_kernels.ALGORITHMS
    if conv_kernels.applies(algorithm, *case[2:]) and _pooled(*case)])
@pytest.mark.parametrize("relu", [False, True])
def test_a_conv_fused_with_its_max_pool_matches_the_reference(shape, F, K, S, P, algorithm, dtype, relu):
    """The conv's output pooled block by block in cache (odd sizes drop their last row
    or column, as floor mode does), the pool's gradient made block by block for the
    conv's backward, and with ``relu`` the ReLU after the pool taken into the step:
    against the reference conv, max-pool (and ReLU); and the same numbers as the
    unfused kernels, bit for bit (the same operations on the same blocks)."""
    rng = np.random.default_rng(sum(shape) + F + K)
    x = rng.standard_normal(shape).astype(dtype)
    conv = Conv2D(shape[1], F, K, S, P, rng=rng, dtype=dtype)
    conv.params["b"][...] = rng.standard_normal(F)
    conv.algorithm = algorithm
    for input_grad in (True, False):
        conv.input_grad = input_grad
        pool, act = MaxPool2D(2), ReLU() if relu else None
        if not conv.fuses_with(pool, nhwc_memory(x)):
            assert input_grad and S > 1   # col2im reads the whole upstream gradient
            continue
        assert conv.absorbs(pool, ReLU()) and not conv.absorbs(pool, GELU())
        out = conv.forward_fused(nhwc_memory(x), pool, act)
        expected, ref_cache = reference.conv_forward(x, conv.params["W"], conv.params["b"], S, P)
        expected, pool_cache = reference.maxpool_forward(expected, 2, 2)
        if relu:
            expected, relu_mask = reference.relu_forward(expected)
        dout = rng.standard_normal(expected.shape).astype(dtype)
        dx = conv.backward_fused(nhwc_memory(dout))
        dw, db = conv.grads["W"].copy(), conv.grads["b"].copy()
        ref_dpool = reference.relu_backward(dout, relu_mask) if relu else dout
        ref_dx, ref_dw, ref_db = reference.conv_backward(reference.maxpool_backward(ref_dpool, pool_cache)[0],
                                                         ref_cache)
        rtol = WIDE_RTOL[dtype] if algorithm.startswith("winograd") and K == 5 else RTOL[algorithm, dtype]
        assert_close(out, expected, rtol, err_msg="pooled")
        assert_close(dw, ref_dw, rtol, err_msg="dw")
        assert_close(db, ref_db, rtol, err_msg="db")
        assert (dx is None) == (not input_grad)
        if input_grad:
            assert_close(dx, ref_dx, rtol, err_msg="dx")
        unfused = pool.forward(conv.forward(nhwc_memory(x), train=True), train=True)
        if relu:
            unfused = act.forward(unfused, train=True)
        d_pool = act.backward(nhwc_memory(dout)) if relu else nhwc_memory(dout)
        unfused_dx = conv.backward(pool.backward(d_pool))
        np.testing.assert_array_equal(out, unfused)
        np.testing.assert_array_equal(conv.grads["W"], dw)
        np.testing.assert_array_equal(conv.grads["b"], db)
        if input_grad:
            np.testing.assert_array_equal(dx, unfused_dx)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [ReLU, GELU])
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5, 6), (7, 16, 4, 5)])
def test_batchnorm_fused_with_its_activation_matches_the_reference(shape, activation, dtype):
    """The activation in the batch norm's last pass, its derivative in the first pass
    back: against the reference batch norm then activation, and bit for bit the
    unfused kernels (the same operations on the same blocks)."""
    rng = np.random.default_rng(sum(shape))
    c = shape[1]
    x = (3 * rng.standard_normal(shape) + 1).astype(dtype)
    x = nhwc_memory(x) if x.ndim == 4 else x
    bn = BatchNorm(c, dtype=dtype)
    bn.params["gamma"][...], bn.params["beta"][...] = rng.standard_normal(c), rng.standard_normal(c)
    act = activation()
    assert bn.fuses_with(act, x)
    out = bn.forward_fused(x, act)
    running = {k: v.copy() for k, v in bn.buffers.items()}
    expected, ref_cache = reference.batchnorm_forward(x, bn.params["gamma"], bn.params["beta"],
                                                      np.zeros(c, dtype), np.ones(c, dtype), 0.9, 1e-5, True)
    ref_forward, ref_backward = {ReLU: (reference.relu_forward, reference.relu_backward),
                                 GELU: (reference.gelu_forward, reference.gelu_backward)}[activation]
    expected, act_cache = ref_forward(expected)
    dout = rng.standard_normal(shape).astype(dtype)
    dx = bn.backward_fused(dout)
    grads = {k: g.copy() for k, g in bn.grads.items()}
    ref_dx, ref_dgamma, ref_dbeta = reference.batchnorm_backward(ref_backward(dout, act_cache), ref_cache)
    rtol = 2e-6 if dtype == np.float32 else 1e-12
    assert_close(out, expected, rtol)
    assert_close(dx, ref_dx, 10 * rtol)
    assert_close(grads["gamma"], ref_dgamma, 10 * rtol)
    assert_close(grads["beta"], ref_dbeta, 10 * rtol)
    bn.buffers["running_mean"][...], bn.buffers["running_var"][...] = 0, 1
    np.testing.assert_array_equal(act.forward(bn.forward(x, train=True), train=True), out)
    for name, value in running.items():
        np.testing.assert_array_equal(bn.buffers[name], value)
    np.testing.assert_array_equal(bn.backward(act.backward(dout)), dx)
    for name, g in grads.items():
        np.testing.assert_array_equal(bn.grads[name], g)
    with pytest.raises(ValueError, match="in training only"):
        batchnorm_kernels.batchnorm_forward(x, bn.params["gamma"], bn.params["beta"], *running.values(),
                                            0.9, 1e-5, False, activation=act.kind)


@pytest.mark.parametrize("m, r", sorted(winograd.MATRICES))
def test_each_winograd_form_is_a_minimal_filtering_algorithm(m, r):
    """A^T [(G g) . (B^T d)] is the correlation of g with d, y_i = sum_k g_k d_(i+k), for
    every form's matrices (the 2D form is this along both axes), to float64's rounding;
    and it uses a = m + r - 1 multiplications, B^T's a x a, G's a x r, A^T's m x a."""
    BT, G, AT = winograd.MATRICES[m, r]
    a = m + r - 1
    assert BT.shape == (a, a) and G.shape == (a, r) and AT.shape == (m, a)
    # the identity on every pair of unit vectors, i.e. exactly the correlation's coefficients
    product = np.einsum("ij,jk,jl->ikl", AT, G, BT)                # (output i, tap k, input l)
    expected = np.zeros((m, r, a))
    for i in range(m):
        for k in range(r):
            expected[i, k, i + k] = 1
    np.testing.assert_allclose(product, expected, rtol=0, atol=1e-14)
    rng = np.random.default_rng(m * r)
    g, d = rng.standard_normal(r), rng.standard_normal(a)
    np.testing.assert_allclose(AT @ ((G @ g) * (BT @ d)), np.correlate(d, g, "valid"), rtol=1e-13)


@pytest.mark.parametrize("tile, K", [(2, 3), (4, 3), (2, 5), (4, 5)])
def test_winograd_on_cifar_sized_layers_within_a_float32_tolerance(tile, K):
    """A realistic layer (64 -> 64 channels on 16x16, as in conv6bn) against the
    direct conv computed in float64: the worst error relative to the largest entry."""
    rng = np.random.default_rng(tile + K)
    x = rng.standard_normal((2, 64, 16, 16)).astype(np.float32)
    w = (rng.standard_normal((64, 64, K, K)) * np.sqrt(2 / (64 * K * K))).astype(np.float32)
    b = np.zeros(64, np.float32)
    P = K // 2
    out, cache = conv_kernels.forward(f"winograd{tile}", nhwc_memory(x), w, b, 1, P, {})
    exact, exact_cache = reference.conv_forward(x.astype(np.float64), w.astype(np.float64), b, 1, P)
    dout = rng.standard_normal(exact.shape)
    dx, dw, _ = conv_kernels.backward(nhwc_memory(dout.astype(np.float32)), cache)
    exact_dx, exact_dw, _ = reference.conv_backward(dout, exact_cache)
    # measured here (four seeds): at most 7e-7 (F(2x2, 3x3)), 8e-6 (F(4x4, 3x3)), 1.1e-5
    # (F(2x2, 5x5)), 8e-6 (F(4x4, 5x5))
    bound = {(2, 3): 2e-6, (4, 3): 2e-5, (2, 5): 2e-5, (4, 5): 2e-5}[tile, K]
    assert_close(out, exact, bound)
    assert_close(dx, exact_dx, bound)
    assert_close(dw, exact_dw, bound)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, size, stride", [
    ((2, 3, 8, 8), 2, 2), ((1, 4, 7, 9), 2, 2), ((3, 5, 31, 31), 2, 2), ((2, 2, 7, 5), 3, 2),
    ((4, 3, 3, 3), 3, 3), ((2, 6, 4, 4), 4, 4), ((1, 2, 6, 5), 2, 1),
])
def test_maxpool_kernels_match_the_reference(shape, size, stride, dtype):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(dtype)
    x[0, 0, 0, :2] = x[0, 0, 1, :2] = 7  # a tie: the first maximum wins in both
    out, cache = pool_kernels.maxpool_forward(nhwc_memory(x), size, stride)
    expected, ref_cache = reference.maxpool_forward(x, size, stride)
    np.testing.assert_array_equal(out, expected)
    dout = rng.standard_normal(expected.shape).astype(dtype)
    for layout in (nhwc_memory, np.ascontiguousarray):   # after a conv, or after a Linear
        np.testing.assert_array_equal(pool_kernels.maxpool_backward(layout(dout), cache)[0],
                                      reference.maxpool_backward(dout, ref_cache)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 5), (1, 3), (4, 3, 5, 6), (1, 8, 3, 3), (7, 16, 4, 5)])
def test_batchnorm_kernels_match_the_reference(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    c = shape[1]
    x = (3 * rng.standard_normal(shape) + 1).astype(dtype)
    x = nhwc_memory(x) if x.ndim == 4 else x
    gamma, beta = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rtol = 2e-6 if dtype == np.float32 else 1e-12
    fast_running = [np.zeros(c, dtype), np.ones(c, dtype)]
    ref_running = [np.zeros(c, dtype), np.ones(c, dtype)]
    out, cache = batchnorm_kernels.batchnorm_forward(x, gamma, beta, *fast_running, 0.9, 1e-5, True)
    expected, ref_cache = reference.batchnorm_forward(x, gamma, beta, *ref_running, 0.9, 1e-5, True)
    assert_close(out, expected, rtol)
    for ours, theirs in zip(fast_running, ref_running, strict=True):
        assert_close(ours, theirs, rtol)
    dout = rng.standard_normal(shape).astype(dtype)
    for ours, theirs in zip(batchnorm_kernels.batchnorm_backward(dout, cache),
                            reference.batchnorm_backward(dout, ref_cache), strict=True):
        assert_close(ours, theirs, 10 * rtol)
    eval_out, _ = batchnorm_kernels.batchnorm_forward(x, gamma, beta, *fast_running, 0.9, 1e-5, False)
    assert_close(eval_out, reference.batchnorm_forward(x, gamma, beta, *ref_running, 0.9, 1e-5, False)[0],
                 rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 4), (1, 5, 3, 3), (6, 8, 7, 5), (7, 8, 7, 5)])
def test_elementwise_kernels_match_the_reference(shape, dtype):
    """In blocks of a few images (the last one shorter for 7 images), on two threads."""
    rng = np.random.default_rng(sum(shape))
    x = nhwc_memory(3 * rng.standard_normal(shape).astype(dtype)) if len(shape) == 4 else \
        3 * rng.standard_normal(shape).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    out, mask = elementwise.relu_forward(x)
    ref_out, ref_mask = reference.relu_forward(x)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(elementwise.relu_backward(dout, mask),
                                  reference.relu_backward(dout, ref_mask))
    out, slope = elementwise.gelu_forward(x, train=True)
    ref_out, ref_cache = reference.gelu_forward(x)
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    assert out.dtype == dtype and slope.dtype == dtype
    assert_close(out, ref_out, rtol)
    assert_close(elementwise.gelu_backward(dout, slope), reference.gelu_backward(dout, ref_cache), rtol)


@pytest.mark.parametrize("layout", [np.ascontiguousarray, nhwc_memory])   # after a Linear, after a conv
def test_linear_kernel_matches_the_reference(monkeypatch, layout):
    """After a conv (NHWC memory) the kernel multiplies x flattened in memory order by W's
    rows put in that order: the same sums in another order, and dx in x's memory order."""
    rng = np.random.default_rng(0)
    layer = Linear(300, 70, rng=rng)
    x, dout = rng.standard_normal((260, 3, 10, 10)), rng.standard_normal((260, 70))
    out = layer.forward(layout(x))
    dx = layer.backward(dout)
    assert dx.strides == layout(x).strides        # the gradient in the input's memory order
    grads = {name: g.copy() for name, g in layer.grads.items()}
    monkeypatch.setenv("NNX_KERNELS", "reference")
    assert_close(layer.forward(x), out, 1e-13)
    assert_close(layer.backward(dout), dx, 1e-13)
    for name, g in grads.items():
        assert_close(layer.grads[name], g, 1e-13, err_msg=name)


# ---- the switches ----------------------------------------------------------------------

def test_nnx_kernels_reference_runs_the_reference_layers(monkeypatch):
    """With NNX_KERNELS=reference every layer computes exactly what mlp/reference.py does
    (the same operations: the same bits); any other value but fast is named and ignored."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 6, 6))
    conv = Conv2D(4, 5, 3, padding=1, rng=rng, dtype=np.float64)
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    bn = BatchNorm(4, dtype=np.float64)
    bn.params["gamma"][...], bn.params["beta"][...] = gamma, beta
    monkeypatch.setenv("NNX_KERNELS", "reference")
    cases = [
        (conv, lambda: reference.conv_forward(x, conv.params["W"], conv.params["b"], 1, 1),
         reference.conv_backward),
        (MaxPool2D(2), lambda: reference.maxpool_forward(x, 2, 2),
         lambda d, c: reference.maxpool_backward(d, c)[0]),
        (bn, lambda: reference.batchnorm_forward(x, gamma, beta, np.zeros(4), np.ones(4), 0.9, 1e-5, True),
         reference.batchnorm_backward),
        (ReLU(), lambda: reference.relu_forward(x), reference.relu_backward),
        (GELU(), lambda: reference.gelu_forward(x), reference.gelu_backward),
    ]
    for layer, forward, backward in cases:
        out = layer.forward(x, train=True)
        expected, cache = forward()
        np.testing.assert_array_equal(out, expected, err_msg=layer.kind)
        dout = rng.standard_normal(out.shape)
        expected_dx = backward(dout, cache)
        expected_dx = expected_dx[0] if isinstance(expected_dx, tuple) else expected_dx
        np.testing.assert_array_equal(layer.backward(dout), expected_dx, err_msg=layer.kind)
    assert conv.algorithm is None                     # the reference chose no fast algorithm
    monkeypatch.setenv("NNX_KERNELS", "fastest-please")
    with pytest.warns(UserWarning, match="NNX_KERNELS='fastest-please'"):
        conv.forward(x, train=True)
    assert conv.algorithm == "im2col"                 # back on the fast kernels


@pytest.mark.parametrize("forced", conv_kernels.ALGORITHMS)
def test_nnx_conv_algorithm_forces_the_algorithm_where_it_applies(monkeypatch, forced):
    monkeypatch.setenv("NNX_CONV_ALGORITHM", forced)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    three, five = Conv2D(3, 4, 3, padding=1, rng=rng), Conv2D(3, 4, 5, padding=2, rng=rng)
    seven = Conv2D(3, 4, 7, padding=3, rng=rng)
    three.algorithm = "im2col"       # a recorded choice: forcing overrides it
    out = three.forward(x, train=True)
    five.forward(x, train=True)
    seven.forward(x, train=True)
    # F(2x2) and F(4x4) have 3x3 and 5x5 forms; 7x7 has none; im2col2 takes them all.
    assert three.algorithm == forced
    assert seven.algorithm == (forced if forced.startswith("im2col") else "im2col")
    assert five.algorithm == forced
    expected, _ = conv_kernels.forward(forced, x, three.params["W"], three.params["b"], 1, 1, {})
    np.testing.assert_array_equal(out, expected)


def test_a_bad_nnx_conv_algorithm_is_named_and_ignored(monkeypatch):
    monkeypatch.setenv("NNX_CONV_ALGORITHM", "fft")
    with pytest.warns(UserWarning, match="NNX_CONV_ALGORITHM='fft'"):
        assert conv_kernels.forced_algorithm() is None
    monkeypatch.setenv("NNX_CONV_ALGORITHM", "AUTO")
    assert conv_kernels.forced_algorithm() is None


def test_the_fastest_candidate_is_chosen_by_timing(monkeypatch):
    """A candidate made slow loses; the choice is kept per shape and measured once."""
    import time
    real_forward = conv_kernels.forward
    calls = []

    def slowed(algorithm, *args):
        calls.append(algorithm)
        if algorithm != "winograd2":
            time.sleep(0.01)
        return real_forward(algorithm, *args)

    monkeypatch.setattr(conv_kernels, "forward", slowed)
    monkeypatch.setattr(conv_kernels, "MIN_MEASURED_FLOPS", 0)
    monkeypatch.setattr(conv_kernels, "MIN_WINOGRAD_CHANNELS", 1)
    monkeypatch.setattr(conv_kernels, "_chosen", {})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    layer = Conv2D(3, 4, 3, padding=1, rng=rng)
    layer.forward(x, train=True)
    assert layer.algorithm == "winograd2"
    measured = len(calls)
    assert measured == 3 * len(conv_kernels.ALGORITHMS) + 1     # three rounds, then the real forward
    twin = Conv2D(3, 4, 3, padding=1, rng=rng)
    twin.forward(x, train=True)
    assert twin.algorithm == "winograd2" and len(calls) == measured + 1   # the kept choice


def test_close_candidates_are_timed_again(monkeypatch):
    """The two best within CLOSE of each other get more rounds, and the best time of all
    the rounds decides; a clear winner is not timed again."""
    answers, asked = [], []

    def timings(x, w, stride, padding, input_grad, candidates, rounds, pooled):
        asked.append(tuple(candidates))
        return answers.pop(0)

    monkeypatch.setattr(conv_kernels, "timings", timings)
    x, w = np.zeros((2, 3, 8, 8), np.float32), np.zeros((4, 3, 3, 3), np.float32)
    names = ("im2col", "im2col2", "winograd2")
    answers[:] = [{"im2col": [9, 1.0, 1.1], "im2col2": [9, 1.1, 1.05], "winograd2": [9, 2.0, 2.0]},
                  {"im2col": [9, 1.2, 1.0], "im2col2": [9, 0.9, 1.3, 1.0]}]
    assert conv_kernels.fastest(x, w, 1, 1, True, names) == "im2col2"
    assert asked == [names, ("im2col", "im2col2")]
    asked.clear()
    answers[:] = [{"im2col": [9, 1.0, 1.1], "im2col2": [9, 1.2, 1.3], "winograd2": [9, 2.0, 2.0]}]
    assert conv_kernels.fastest(x, w, 1, 1, True, names) == "im2col" and asked == [names]


def test_a_conv_before_a_max_pool_is_measured_with_it_fused_or_not(monkeypatch):
    """The measurement times a conv as the network will run it: with its 2x2 max-pool,
    fused where the candidate fuses (im2col2's tiles go to the pool as they are)."""
    asked = []
    real_fastest = conv_kernels.fastest

    def fastest(*args, pooled=False, **kwargs):
        asked.append(pooled)
        return real_fastest(*args, pooled=pooled, **kwargs)

    monkeypatch.setattr(conv_kernels, "fastest", fastest)
    monkeypatch.setattr(conv_kernels, "MIN_MEASURED_FLOPS", 0)
    monkeypatch.setattr(conv_kernels, "_chosen", {})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 9, 9)).astype(np.float32)
    conv, pool = Conv2D(3, 4, 3, padding=1, rng=rng), MaxPool2D(2)
    assert conv.fuses_with(pool, x) and asked == [True]
    assert conv.algorithm in ("im2col", "im2col2")
    alone = Conv2D(3, 4, 3, padding=1, rng=rng)
    alone.forward(x, train=True)
    assert asked == [True, False]                   # a choice of its own, unpooled
    # stride 2 with an input gradient: col2im, which does not fuse, times conv then pool
    strided = Conv2D(3, 4, 3, stride=2, padding=1, rng=rng)
    assert real_fastest(x, strided.params["W"], 2, 1, True, ("im2col",), rounds=2, pooled=True) == "im2col"


def test_small_layers_run_im2col_unmeasured_and_few_channels_are_not_offered_winograd(monkeypatch):
    offered = []

    def fastest(x, w, stride, padding, input_grad, candidates, pooled):
        offered.append(candidates)
        return candidates[-1]

    monkeypatch.setattr(conv_kernels, "fastest", fastest)
    monkeypatch.setattr(conv_kernels, "_chosen", {})
    rng = np.random.default_rng(0)
    small = Conv2D(16, 16, 3, padding=1, rng=rng)
    small.forward(rng.standard_normal((2, 16, 8, 8)).astype(np.float32))
    assert small.algorithm == "im2col" and offered == []
    few = Conv2D(3, 64, 3, padding=1, rng=rng)
    few.forward(rng.standard_normal((64, 3, 32, 32)).astype(np.float32))
    assert offered == [("im2col", "im2col2")] and few.algorithm == "im2col2"
    strided = Conv2D(3, 64, 3, stride=2, padding=1, rng=rng)      # nothing else applies
    strided.forward(rng.standard_normal((64, 3, 65, 65)).astype(np.float32))
    assert strided.algorithm == "im2col" and len(offered) == 1
    # from MIN_WINOGRAD_CHANNELS (8) channels in and out, both Winograd tiles are offered
    for C, winograd_too in ((7, False), (8, True)):
        layer = Conv2D(C, 8, 5, padding=2, rng=rng)
        layer.forward(rng.standard_normal((64, C, 32, 32)).astype(np.float32))
        expected = ("im2col", "im2col2") + (("winograd2", "winograd4") if winograd_too else ())
        assert offered[-1] == expected and layer.algorithm == expected[-1]


def test_the_algorithm_is_saved_with_the_model_and_honoured_on_load(tmp_path):
    from mlp.arch import build_convnet
    net = build_convnet("conv8x3-conv8x3-pool2-fc10", (3, 8, 8), 10, seed=0)
    net.layers[2].algorithm = "winograd4"
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    scores = net.scores(x)
    assert net.conv_algorithms() == {"0": "im2col", "2": "winograd4"}
    net.save(tmp_path / "model.npz")
    loaded = Network.load(tmp_path / "model.npz")
    assert loaded.conv_algorithms() == {"0": "im2col", "2": "winograd4"}
    np.testing.assert_array_equal(loaded.scores(x), scores)
    spec = net.spec()
    spec["conv_algorithms"] = {"2": "winograd9"}
    with pytest.raises(ValueError, match="winograd9"):
        Network.from_spec(spec)
    spec["conv_algorithms"] = {}                      # files from before the record load as before
    assert Network.from_spec(spec).conv_algorithms() == {}


def test_a_model_file_with_a_bad_algorithm_is_refused(tmp_path):
    from mlp.arch import build_convnet
    net = build_convnet("conv4x7-fc10", (3, 8, 8), 10)
    net.layers[0]._algorithm = "winograd4"            # past the setter: a 7x7 conv has no Winograd form
    net.save(tmp_path / "bad.npz")
    with pytest.raises(ModelFileError, match="corrupt nnx model spec .*winograd4"):
        Network.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("C, K, S, Ho, Wo", [(3, 3, 1, 7, 5), (3, 7, 1, 4, 6), (3, 8, 2, 3, 4),
                                             (2, 5, 2, 4, 3), (4, 8, 1, 2, 2), (16, 5, 1, 3, 4),
                                             (1, 3, 1, 5, 5), (3, 2, 1, 4, 4)])
def test_im2col_gathers_each_field_by_either_path(monkeypatch, C, K, S, Ho, Wo):
    """Inputs of few channels are gathered in two stages, others directly: both copy
    exactly field (kh, kw, c) of output (i, j) to row (n, i, j)."""
    from mlp.kernels import im2col as im2col_kernels
    rng = np.random.default_rng(K * C)
    n, Hp, Wp = 2, S * (Ho - 1) + K + 1, S * (Wo - 1) + K + 1     # a spare row and column
    xp = rng.standard_normal((n, Hp, Wp, C)).astype(np.float32)
    expected = np.stack([xp[b, i * S:i * S + K, j * S:j * S + K, :].ravel()
                         for b in range(n) for i in range(Ho) for j in range(Wo)])
    for few in (0, 10_000):       # every input directly, every input in two stages (K >= 3)
        monkeypatch.setattr(im2col_kernels, "FEW_CHANNELS", few)
        cols = np.full((n * Ho * Wo, K * K * C + 1), np.nan, np.float32)
        im2col_kernels.im2col(xp, cols, K, S, Ho, Wo)
        assert np.array_equal(cols[:, :-1], expected)
        assert np.isnan(cols[:, -1]).all()           # the ones column is the caller's


@pytest.mark.parametrize("fields, F", [(13, 24), (76, 16), (148, 32), (401, 20), (577, 80)])
def test_weight_grad_is_cols_transposed_times_d_either_way(monkeypatch, fields, F):
    """A block's weight gradient, cols^T d, whichever of the two products computes it."""
    from mlp.kernels import im2col as im2col_kernels
    rng = np.random.default_rng(fields)
    cols = rng.standard_normal((300, fields)).astype(np.float32)
    d = rng.standard_normal((300, F)).astype(np.float32)
    expected = cols.astype(np.float64).T @ d.astype(np.float64)
    for threshold in (0, 10_000):       # every product transposed, none transposed
        monkeypatch.setattr(im2col_kernels, "TRANSPOSED_WEIGHT_GRAD_FIELDS", threshold)
        product = im2col_kernels.weight_grad(cols, d)
        assert product.shape == (fields, F)
        assert_close(product, expected, rtol=1e-5)
