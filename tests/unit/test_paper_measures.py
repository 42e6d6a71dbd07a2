"""paper_measures (MultiMax paper, Defs. 3.2 and 3.3) on small rows worked out by hand."""

import math

import pytest
import torch

from hf_multimax.analysis import multimodality as top2_multimodality
from hf_multimax.analysis.paper_measures import paper_measures, paper_multimodality, paper_sparsity

E2, E4, E11, E22 = math.exp(-2), math.exp(-4), math.exp(-11), math.exp(-22)

# Figure 1 style input x = (10, 8, -1) through SoftMax: Z = e^10 + e^8 + e^-1, so
#   φ1 = 1/(1 + e^-2 + e^-11),  φ2 = e^-2·φ1,  φ3 = e^-11·φ1.
PHI1 = 1 / (1 + E2 + E11)
PHI2, PHI3 = E2 * PHI1, E11 * PHI1
# With ε = 0: relevant = {8} (N = 1), irrelevant = {-1} (L = 1).
M_SOFTMAX = 1 - (PHI1 - PHI2)  # = 1 - φ1(1 - e^-2) = 0.238417
# Default s = smallest temperature-1 SoftMax probability of x = φ3, so S = exp(-φ3/φ3) = 1/e.
S_SOFTMAX = math.exp(-1)


def row(*values, dtype=torch.float64):
    """One (1, 1, 1, k) attention row."""
    return torch.tensor(values, dtype=dtype).view(1, 1, 1, -1)


def test_softmax_on_figure_1_input():
    x = row(10.0, 8.0, -1.0)
    w = x.softmax(-1)
    assert M_SOFTMAX == pytest.approx(0.2384170, abs=1e-7)  # 1 - 0.880783·0.864665
    assert paper_multimodality(x, w).item() == pytest.approx(M_SOFTMAX, rel=1e-12)
    assert paper_sparsity(x, w).item() == pytest.approx(S_SOFTMAX, rel=1e-12)
    # With one relevant entry besides the max, Def. 3.2 reduces to analysis.multimodality's 1 - (p(1) - p(2)).
    assert paper_multimodality(x, w).item() == pytest.approx(top2_multimodality(w).item(), rel=1e-6)  # float32 there


def test_lower_temperature_trades_multimodality_for_sparsity():
    # SoftMax at temperature 1/2: φ' = softmax(20, 16, -2) = (1, e^-4, e^-22)/(1 + e^-4 + e^-22); s is still φ3 (t = 1).
    x = row(10.0, 8.0, -1.0)
    w = (2 * x).softmax(-1)
    denom = 1 + E4 + E22
    m = 1 - (1 - E4) / denom  # 0.03597
    s = math.exp(-(E22 / denom) / PHI3)  # exp(-e^-11·(1 + e^-2 + e^-11)/(1 + e^-4 + e^-22)) = 0.99998
    assert paper_multimodality(x, w).item() == pytest.approx(m, rel=1e-12)
    assert paper_sparsity(x, w).item() == pytest.approx(s, rel=1e-9)
    assert m < M_SOFTMAX and s > S_SOFTMAX


def test_a_map_that_is_both_sparse_and_multimodal():
    # Weights (0.5, 0.5, 0) on x = (10, 8, -1): M = 1 - (0.5 - 0.5) = 1, S = exp(-0/s) = 1: the maximum of both.
    x = row(10.0, 8.0, -1.0)
    w = row(0.5, 0.5, 0.0)
    assert paper_multimodality(x, w).item() == 1.0
    assert paper_sparsity(x, w).item() == 1.0


def test_several_entries_and_an_explicit_reference():
    # x = (3, 2, 1, -1, -2), φ = (0.4, 0.3, 0.2, 0.06, 0.04), ε = 0:
    #   M = 1 - ((0.4 - 0.3) + (0.4 - 0.2))/2 = 1 - 0.15 = 0.85
    #   s = 0.04: S = (exp(-0.06/0.04) + exp(-0.04/0.04))/2 = (e^-1.5 + e^-1)/2;  s = 0.02: (e^-3 + e^-2)/2
    x = row(3.0, 2.0, 1.0, -1.0, -2.0)
    w = row(0.4, 0.3, 0.2, 0.06, 0.04)
    assert paper_multimodality(x, w).item() == pytest.approx(0.85)
    assert paper_sparsity(x, w, reference=0.04).item() == pytest.approx((math.exp(-1.5) + math.exp(-1)) / 2)
    assert paper_sparsity(x, w, reference=0.02).item() == pytest.approx((math.exp(-3) + math.exp(-2)) / 2)
    # eps moves entries between the sets: eps = 1.5 leaves only x = 2 relevant and puts 1 among the irrelevant.
    assert paper_multimodality(x, w, eps=1.5).item() == pytest.approx(1 - (0.4 - 0.3))
    expected = (math.exp(-0.2 / 0.04) + math.exp(-1.5) + math.exp(-1)) / 3
    assert paper_sparsity(x, w, eps=1.5, reference=0.04).item() == pytest.approx(expected)


def test_entries_at_the_threshold_are_in_neither_set():
    # x = (2, 0, -1), ε = 0: the 0 is neither relevant nor irrelevant, so N = 0 (M undefined) and L = 1.
    x = row(2.0, 0.0, -1.0)
    w = row(0.6, 0.3, 0.1)
    assert math.isnan(paper_multimodality(x, w).item())
    assert paper_sparsity(x, w, reference=0.1).item() == pytest.approx(math.exp(-1))


def test_tied_modes_count_as_fully_multimodal():
    x = row(5.0, 5.0, -1.0)
    assert paper_multimodality(x, x.softmax(-1)).item() == pytest.approx(1.0)


def test_masked_keys_are_ignored():
    x = row(3.0, 2.0, 1.0, -1.0, -2.0)
    w = row(0.4, 0.3, 0.2, 0.06, 0.04)
    # Two padding keys: a huge score with a large weight (would be the max), and a very negative one with weight 0
    # (would be an extra irrelevant entry scoring 1).
    x_pad = row(3.0, 2.0, 1.0, -1.0, -2.0, 100.0, -1e9)
    w_pad = row(0.4, 0.3, 0.2, 0.06, 0.04, 0.9, 0.0)
    valid = torch.tensor([True] * 5 + [False, False]).view(1, 1, 1, -1)
    for measure, kwargs in ((paper_multimodality, {}), (paper_sparsity, {"reference": 0.04})):
        expected = measure(x, w, **kwargs)
        assert measure(x_pad, w_pad, valid, **kwargs).item() == pytest.approx(expected.item())
        assert measure(x_pad, w_pad, **kwargs).item() != pytest.approx(expected.item())  # the mask matters


def test_minus_infinity_scores_are_masked_without_a_mask():
    x = row(10.0, 8.0, -1.0, float("-inf"))
    w = x.softmax(-1)
    assert paper_multimodality(x, w).item() == pytest.approx(M_SOFTMAX, rel=1e-12)
    assert paper_sparsity(x, w).item() == pytest.approx(S_SOFTMAX, rel=1e-12)


def test_one_value_per_head_averaged_over_rows():
    # (batch 2, heads 2, q 1, k 3). Head 0: the SoftMax row twice. Head 1: the SoftMax row and (0.5, 0.5, 0).
    x = torch.tensor([10.0, 8.0, -1.0], dtype=torch.float64).expand(2, 2, 1, 3)
    soft = x[0, 0, 0].softmax(-1)
    both_modes = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    w = torch.stack([torch.stack([soft, soft]), torch.stack([soft, both_modes])]).view(2, 2, 1, 3)
    m = paper_multimodality(x, w)
    s = paper_sparsity(x, w)
    assert m.shape == s.shape == (2,)
    assert m.tolist() == pytest.approx([M_SOFTMAX, (M_SOFTMAX + 1) / 2])
    assert s.tolist() == pytest.approx([S_SOFTMAX, (S_SOFTMAX + 1) / 2])
    both = paper_measures(x, w)
    assert both["paper_multimodality"].tolist() == m.tolist() and both["paper_sparsity"].tolist() == s.tolist()


def test_single_valid_key_and_fully_masked_rows_are_left_out():
    # (batch 1, heads 2, q 3, k 3). Head 0: row 0 the SoftMax row, row 1 a single valid key, row 2 fully masked
    # (its weights NaN, as a SoftMax over only -inf gives). Head 1: only the single-key and fully masked rows.
    x = torch.tensor([10.0, 8.0, -1.0], dtype=torch.float64).repeat(1, 2, 3, 1)
    w = x.softmax(-1).clone()
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[:, :, 1, 1:] = False
    w[:, :, 1] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    valid[:, :, 2] = False
    x[:, :, 2] = float("-inf")
    w[:, :, 2] = float("nan")
    valid[:, 1, 0] = False  # head 1 keeps no usable row
    x[:, 1, 0] = float("-inf")
    m = paper_multimodality(x, w, valid)
    s = paper_sparsity(x, w, valid)
    assert m[0].item() == pytest.approx(M_SOFTMAX, rel=1e-12)
    assert s[0].item() == pytest.approx(S_SOFTMAX, rel=1e-12)
    assert math.isnan(m[1].item()) and math.isnan(s[1].item())  # undefined, not a made-up 0


def test_weights_only_softmax_caller():
    # For SoftMax weights, scores = log(weights) shifts each row by log Z = 10.127..., so ε = 0 on x matches
    # ε = log(0.01) on the log-weights (log φ = (-0.13, -2.13, -11.13)); the default s is then min φ itself.
    x = row(10.0, 8.0, -1.0)
    w = x.softmax(-1)
    eps = math.log(0.01)
    assert paper_multimodality(w.log(), w, eps=eps).item() == pytest.approx(M_SOFTMAX, rel=1e-12)
    assert paper_sparsity(w.log(), w, eps=eps).item() == pytest.approx(S_SOFTMAX, rel=1e-12)


def test_float32_and_tiny_reference_stay_finite():
    # s = e^-200 underflows in float32; the log-space ratio still gives exp(-φ/s) = 0 for a positive weight.
    x = row(10.0, 8.0, -1.0, dtype=torch.float32)
    w = x.softmax(-1)
    s = paper_sparsity(x, w, reference=math.exp(-200))
    assert s.dtype == torch.float32 and s.item() == 0.0
    assert paper_sparsity(x, w).item() == pytest.approx(S_SOFTMAX, rel=1e-5)


def test_bad_arguments():
    x = row(1.0, 0.0, -1.0)
    for bad in (0.0, float("nan"), torch.tensor([0.5, 0.0])):
        with pytest.raises(ValueError, match="positive"):
            paper_sparsity(x, x.softmax(-1), reference=bad)
    with pytest.raises(ValueError, match=r"\(batch, heads, q, k\)"):
        paper_multimodality(x, x.softmax(-1)[..., :2])
