"""Sedghi et al.'s singular values and operator-norm clipping, against dense matrices."""

import torch
from reference import dense_matrix, dense_norm, linear_part
from torch import nn

from lipfx.norms import clip_operator_norm, singular_values


def test_circular_singular_values_are_exact():
    for stride in (1, 2):
        conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", stride=stride).double()
        shape = (3, 8, 8)
        dense = torch.linalg.svdvals(dense_matrix(linear_part(conv, shape), shape))
        sv = singular_values(conv, shape)
        assert sv.shape == dense.shape
        assert torch.allclose(sv, dense, atol=1e-10)


def test_zero_padded_singular_values_bound_the_norm():
    conv = nn.Conv1d(2, 3, 3, padding=1).double()
    assert singular_values(conv, (2, 10))[0] >= dense_norm(conv, (2, 10))


def test_clip_leaves_a_kernel_inside_the_ball_unchanged():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular").double()
    top = float(singular_values(conv, (3, 8, 8))[0])
    assert torch.allclose(clip_operator_norm(conv, (3, 8, 8), 2 * top), conv.weight, atol=1e-12)


def test_clip_alternating_projections_converge_to_the_ball():
    for mode, stride in [("circular", 1), ("zeros", 1), ("zeros", 2)]:
        conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode, stride=stride, bias=False).double()
        shape = (3, 8, 8)
        before = float(singular_values(conv, shape)[0])
        target = before / 2
        history = []
        for _ in range(30):
            new = clip_operator_norm(conv, shape, target)
            assert new.shape == conv.weight.shape and new.dtype == conv.weight.dtype
            with torch.no_grad():
                conv.weight.copy_(new)
            history.append(float(singular_values(conv, shape)[0]))
        assert history[0] < 0.7 * before  # one projection removes most of the excess
        assert all(b <= a + 1e-9 for a, b in zip(history, history[1:]))  # monotone
        assert history[-1] <= target * 1.01
        assert dense_norm(conv, shape) <= history[-1] * (1 + 1e-9)  # circulant bounds the conv


def test_clip_does_not_modify_the_module():
    conv = nn.Conv2d(2, 2, 3, padding=1).double()
    before = conv.weight.detach().clone()
    clip_operator_norm(conv, (2, 6, 6), 0.1)
    assert torch.equal(conv.weight, before)
