"""Optimizers and schedules: known values by hand, and torch's optimizers as an oracle."""
import math

import numpy as np
import pytest

from mlp.optim import SGD, Adadelta, Adagrad, Adam, Momentum, Nesterov, RMSprop, Schedule, make_optimizer


def steps(opt, w0, grads):
    w = {"w": np.array(w0, dtype=float)}
    for g in grads:
        opt.step(w, {"w": np.array(g, dtype=float)})
    return w["w"]


def test_sgd_step():
    np.testing.assert_allclose(steps(SGD(0.1), [1.0, 2.0], [[1.0, -2.0]]), [0.9, 2.2])


def test_momentum_is_v_equals_mu_v_minus_lr_dw_then_w_plus_v():
    # v1 = -0.1*1 = -0.1, w = 0.9; v2 = 0.9*-0.1 - 0.1*1 = -0.19, w = 0.71
    np.testing.assert_allclose(steps(Momentum(0.1, mu=0.9), [1.0], [[1.0], [1.0]]), [0.71])


def test_nesterov_cs231n_form():
    # v_prev=0, v=-0.1: w += -0.9*0 + 1.9*-0.1 -> 0.81; v_prev=-0.1, v=-0.19: w += 0.09 - 0.361
    np.testing.assert_allclose(steps(Nesterov(0.1, mu=0.9), [1.0], [[1.0], [1.0]]),
                               [1 - 0.19 + 0.09 - 0.361])


def test_adagrad_first_step_is_lr_times_sign():
    np.testing.assert_allclose(steps(Adagrad(0.5), [0.0, 0.0], [[4.0, -0.25]]), [-0.5, 0.5], rtol=1e-6)


def test_rmsprop_eps_is_outside_the_sqrt():
    opt = RMSprop(0.01, decay=0.9, eps=0.5)
    # cache = 0.1 * 4 = 0.4; step = 0.01 * 2 / (sqrt(0.4) + 0.5)
    np.testing.assert_allclose(steps(opt, [0.0], [[2.0]]), [-0.02 / (math.sqrt(0.4) + 0.5)])


def test_adam_bias_correction_uses_the_incremented_step_count():
    # after one step m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps)
    np.testing.assert_allclose(steps(Adam(0.1), [0.0], [[3.0]]), [-0.1 * 3 / (3 + 1e-8)])
    np.testing.assert_allclose(steps(Adam(0.1), [0.0], [[3.0], [3.0]]), [-0.2], rtol=1e-7)


def test_adadelta_defaults_and_first_step():
    opt = Adadelta()
    assert (opt.rho, opt.eps, opt.lr) == (0.95, 1e-6, 1.0)
    expected = -math.sqrt(1e-6) / math.sqrt(0.05 * 4 + 1e-6) * 2
    np.testing.assert_allclose(steps(opt, [0.0], [[2.0]]), [expected])


def test_make_optimizer_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs")


@pytest.mark.parametrize("name, ours, theirs", [
    ("sgd", lambda: SGD(0.05), lambda t, p: t.optim.SGD(p, lr=0.05)),
    ("momentum", lambda: Momentum(0.05, 0.9), lambda t, p: t.optim.SGD(p, lr=0.05, momentum=0.9)),
    ("nesterov", lambda: Nesterov(0.05, 0.9),
     lambda t, p: t.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    ("adagrad", lambda: Adagrad(0.1, eps=1e-10), lambda t, p: t.optim.Adagrad(p, lr=0.1, eps=1e-10)),
    ("rmsprop", lambda: RMSprop(0.01, decay=0.99), lambda t, p: t.optim.RMSprop(p, lr=0.01, alpha=0.99)),
    ("adam", lambda: Adam(0.01), lambda t, p: t.optim.Adam(p, lr=0.01)),
    ("adadelta", lambda: Adadelta(1.0, rho=0.95, eps=1e-6),
     lambda t, p: t.optim.Adadelta(p, lr=1.0, rho=0.95, eps=1e-6)),
])
def test_optimizer_trajectory_matches_torch(name, ours, theirs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    target = rng.standard_normal(5)
    w = rng.standard_normal(5)
    p = torch.tensor(w.copy(), dtype=torch.float64, requires_grad=True)
    opt_t = theirs(torch, [p])
    opt = ours()
    params = {"w": w}
    for _ in range(20):
        grad = 2 * (params["w"] - target) + np.sin(params["w"])   # a gradient that changes with w
        opt.step(params, {"w": grad})
        opt_t.zero_grad()
        p.grad = 2 * (p.detach() - torch.tensor(target)) + torch.sin(p.detach())
        opt_t.step()
    # with a constant lr, torch's (v = mu v + g; w -= lr v) and the cs231n forms give
    # the same iterates, Nesterov included
    np.testing.assert_allclose(params["w"], p.detach().numpy(), rtol=1e-6, atol=1e-9)


def test_schedules():
    assert Schedule("constant", 0.1)(7.5) == 0.1
    step = Schedule("step", 1.0, step_size=2, lr_decay=0.5)
    assert [step(e) for e in (0, 1.9, 2, 4.5)] == [1.0, 1.0, 0.5, 0.25]
    cosine = Schedule("cosine", 1.0, total=10, min_lr=0.1)
    assert cosine(0) == pytest.approx(1.0)
    assert cosine(5) == pytest.approx(0.55)
    assert cosine(10) == pytest.approx(0.1)
    warm = Schedule("cosine", 1.0, total=10, warmup=2)
    assert warm(1) == pytest.approx(0.5)
    assert warm(2) == pytest.approx(1.0)


def test_nesterov_with_a_schedule_decay_and_lr_groups_matches_torch():
    """A moving lr, weight decay per step independent of lr (wd / lr added to the
    gradient, PyTorch's weight_decay), and a group learning 64x faster: the same
    iterates as torch.optim.SGD(nesterov=True) with two parameter groups."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    w = {"w": rng.standard_normal(6), "b": rng.standard_normal(3)}
    lr, wd = 0.002, 5e-3           # small enough that rounding is not amplified chaotically
    ours = Nesterov(lr, mu=0.85, weight_decay=wd)
    ours.lr_scales["b"] = 64.0
    tw = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in w.items()}
    theirs = torch.optim.SGD([{"params": [tw["w"]], "lr": lr, "weight_decay": wd / lr},
                              {"params": [tw["b"]], "lr": 64 * lr, "weight_decay": wd / (64 * lr)}],
                             momentum=0.85, nesterov=True)
    schedule = Schedule("linear", lr, total=30, warmup=7, warmup_from=0.2, min_lr=0.07 * lr)
    for step in range(30):
        ours.lr = schedule(step)
        for group, base in zip(theirs.param_groups, (lr, 64 * lr), strict=True):
            group["lr"] = base * schedule(step) / lr
        grads = {k: np.cos(3 * v) + v for k, v in w.items()}
        ours.step(w, grads)
        for p in tw.values():
            p.grad = torch.cos(3 * p.detach()) + p.detach()
        theirs.step()
    for k in w:
        np.testing.assert_allclose(w[k], tw[k].detach().numpy(), rtol=1e-10, atol=1e-12)


def test_a_scale_of_zero_freezes_a_parameter():
    opt = Nesterov(0.1, weight_decay=0.01)
    opt.lr_scales["frozen"] = 0.0
    w = {"frozen": np.ones(2), "free": np.ones(2)}
    opt.step(w, {"frozen": np.ones(2), "free": np.ones(2)})
    assert w["frozen"].tolist() == [1.0, 1.0] and "frozen" not in opt.state
    assert w["free"][0] < 1.0


def test_linear_schedule_is_airbenchs_triangle():
    tri = Schedule("linear", 1.0, total=10, warmup=2.5, warmup_from=0.2, min_lr=0.07)
    assert tri(0) == pytest.approx(0.2, abs=1e-9)
    assert tri(1.25) == pytest.approx(0.6)
    assert tri(2.5) == pytest.approx(1.0)
    assert tri(6.25) == pytest.approx((1.0 + 0.07) / 2)
    assert tri(10) == pytest.approx(0.07) and tri(12) == pytest.approx(0.07)


def test_a_warmup_share_moves_with_the_planned_total():
    tri = Schedule("linear", 1.0, total=10, warmup=99, warmup_share=0.25, warmup_from=0.2)
    assert tri.warmup == 2.5 and tri(2.5) == pytest.approx(1.0)
    tri.total = 20                                   # a time budget re-planned the run
    assert tri.warmup == 5.0 and tri(2.5) == pytest.approx(0.6) and tri(5) == pytest.approx(1.0)
