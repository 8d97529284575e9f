"""Training-time power iteration and the reference operator_norm."""

import torch
from reference import dense_norm
from torch import nn

from lipfx.norms import operator_norm, power_iteration


def test_power_iteration_converges_with_the_paper_stopping_rule():
    a = torch.randn(40, 30, dtype=torch.float64)
    res = power_iteration(a, eps=1e-8, max_iter=10_000)
    sigma = torch.linalg.matrix_norm(a, ord=2)
    assert abs(float(res.sigma) - float(sigma)) < 1e-6 * float(sigma)
    w = a.T @ (a @ res.v)
    assert res.v.shape == (30,)  # the state is one vector of length Cin
    assert float(torch.linalg.vector_norm(w - float(res.sigma) ** 2 * res.v)) < 1e-6 * float(sigma) ** 2


def test_warm_start_needs_fewer_iterations():
    a = torch.randn(64, 48, dtype=torch.float64)
    cold = power_iteration(a, eps=1e-3, max_iter=1000)
    a2 = a + 1e-3 * torch.randn_like(a)  # one small optimiser step
    warm = power_iteration(a2, v=cold.v, eps=1e-3, max_iter=1000)
    fresh = power_iteration(a2, eps=1e-3, max_iter=1000)
    assert warm.iterations < fresh.iterations
    assert warm.sigma <= torch.linalg.matrix_norm(a2, ord=2) * (1 + 1e-12)  # from below


def test_power_iteration_sigma_carries_gradients():
    w = torch.randn(5, 4, 1, 1, requires_grad=True)
    res = power_iteration(w, eps=1e-6, max_iter=500)
    res.sigma.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_operator_norm_matches_dense_svd():
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2).double()
    shape = (3, 7, 7)
    true = dense_norm(conv, shape)
    est = operator_norm(lambda x: conv(x.unsqueeze(0)) - conv(torch.zeros(1, *shape, dtype=torch.float64)), shape,
                        iters=5000, tol=1e-14)
    assert abs(est - true) < 1e-6 * true
