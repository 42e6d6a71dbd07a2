"""The math: seglu and multimax against the formula, exact gradients, shapes and bad input."""

import pytest
import torch

from hf_multimax import multimax, seglu


def formula(x, r, t):
    """σ written out term by term from the paper's definition, scalar parameters only."""
    out = x.clone()
    for n in range(1, len(r) // 2 + 1):
        lo, hi = float(r[2 * n - 2]), float(r[2 * n - 1])
        out = out + float(t[2 * n - 2]) * torch.where(x < lo, lo - x, 0.0) ** n
        out = out + float(t[2 * n - 1]) * torch.where(x > hi, x - hi, 0.0) ** n
    return out


@pytest.mark.parametrize("order", [1, 2, 3])
def test_seglu_matches_formula(order):
    g = torch.Generator().manual_seed(order)
    x = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64) * 3
    r = torch.randn(2 * order, generator=g, dtype=torch.float64)
    t = torch.randn(2 * order, generator=g, dtype=torch.float64)
    torch.testing.assert_close(seglu(x, r, t), formula(x, r, t))


def test_order_two_hand_values():
    # r = (0, 1, -1, 2), t = (0.5, -0.5, 0.25, 0.1): check a point in each segment by hand.
    r = torch.tensor([0.0, 1.0, -1.0, 2.0])
    t = torch.tensor([0.5, -0.5, 0.25, 0.1])
    x = torch.tensor([-3.0, 0.5, 1.5, 4.0])
    expected = torch.tensor(
        [
            -3.0 + 0.5 * 3.0 + 0.25 * 2.0**2,  # below r0 and r2
            0.5,  # inside every range: identity
            1.5 - 0.5 * 0.5,  # above r1 only
            4.0 - 0.5 * 3.0 + 0.1 * 2.0**2,  # above r1 and r3
        ]
    )
    torch.testing.assert_close(seglu(x, r, t), expected)


def test_zero_slopes_give_softmax():
    x = torch.randn(4, 6, 10)
    r = torch.randn(4)
    torch.testing.assert_close(multimax(x, r, torch.zeros(4)), torch.softmax(x, -1))


def test_per_head_parameters_broadcast_over_heads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g)
    r = torch.randn(3, 4, generator=g)
    t = torch.randn(3, 4, generator=g)
    out = seglu(x, r, t)
    for h in range(3):
        torch.testing.assert_close(out[:, h], formula(x[:, h], r[h], t[h]))
    torch.testing.assert_close(multimax(x, r, t, dim=-2), torch.softmax(out, -2))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("fn", [seglu, multimax])
def test_gradcheck(fn, order, per_head):
    g = torch.Generator().manual_seed(10 * order + per_head)
    shape = (3, 2 * order) if per_head else (2 * order,)
    x = (torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    r = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, r, t))


def test_gradients_flow_to_every_parameter():
    x = torch.randn(2, 2, 8, 8) * 3
    r = torch.tensor([0.5, -0.5, 1.0, -1.0], requires_grad=True)
    t = torch.full((4,), 0.1, requires_grad=True)
    (multimax(x, r, t) * torch.randn(2, 2, 8, 8)).sum().backward()
    assert (r.grad != 0).all() and (t.grad != 0).all()


@pytest.mark.parametrize(
    "ranges, ts, error, words",
    [
        (torch.zeros(3), torch.zeros(3), ValueError, "(2N,)"),
        (torch.zeros(4), torch.zeros(2), ValueError, "same shape"),
        (torch.zeros(0), torch.zeros(0), ValueError, "N >= 1"),
        (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4), ValueError, "(num_heads, 2N)"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(4), TypeError, "`ranges`"),
        ([0.0] * 4, torch.zeros(4), TypeError, "list"),
    ],
)
def test_bad_parameters_are_named(ranges, ts, error, words):
    with pytest.raises(error, match=r".*" + __import__("re").escape(words)):
        seglu(torch.zeros(2, 4), ranges, ts)


def test_per_head_parameters_need_matching_heads():
    with pytest.raises(ValueError, match="for 3 heads but x has 2 heads"):
        seglu(torch.zeros(1, 2, 4, 4), torch.zeros(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(batch, heads, q, k\)"):
        seglu(torch.zeros(4, 4), torch.zeros(3, 4), torch.zeros(3, 4))
