"""Pre-normalisation scores recorded by ``collect_attention``: they are the scores the weights were computed from
(SoftMax, MultiMax's σ, T5's position bias, GQA, padding), the override of Transformers' mapping is removed again, and
``analyze_model`` reports the paper's measures from them."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, T5Config

import hf_multimax  # noqa: F401  (registers the implementations)
from hf_multimax.analysis import analyze_model, collect_attention
from hf_multimax.analysis.paper_measures import paper_measures
from hf_multimax.masking import safe_softmax


def llama(implementation: str):
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.2,
        multimax_init="paper",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
    if implementation == "multimax":  # a σ far from the identity, so that scores and σ(scores) differ
        for seglu in hf_multimax.multimax_modules(model).values():
            with torch.no_grad():
                seglu.multimax_ts.copy_(torch.tensor([-0.5, 0.3, -0.2, 0.1]))
    return model


def inputs():
    ids = torch.randint(4, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


def rows_with_keys(valid):
    return valid.any(-1, keepdim=True).expand_as(valid)


@pytest.mark.parametrize("implementation", ["sdpa", "multimax"])
def test_recorded_scores_give_the_recorded_weights(implementation):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = llama(implementation)
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    maps, _ = collect_attention(model, inputs())
    assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == before  # the override is gone
    modules = dict(model.named_modules())
    for attention in maps:
        assert attention.scores is not None and attention.scores.shape == attention.weights.shape == (2, 4, 7, 7)
        seglu = getattr(modules[attention.name], "multimax", None)
        z = attention.scores if seglu is None else seglu(attention.scores).detach()
        expected = safe_softmax(z.masked_fill(~attention.valid, float("-inf")))
        keep = rows_with_keys(attention.valid)  # eager SoftMax averages fully masked rows; those are not compared
        torch.testing.assert_close(attention.weights[keep], expected[keep], rtol=1e-5, atol=1e-6)
    if implementation == "multimax":  # σ changed the weights: the scores are σ's input, not its output
        assert not torch.allclose(torch.softmax(maps[0].scores[0], -1), maps[0].weights[0], atol=1e-3)


def test_t5_scores_include_the_position_bias():
    config = T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=100, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    maps, _ = collect_attention(
        model, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(2, 100, (2, 5))}
    )
    assert len(maps) == 6  # 2 encoder, 2 decoder self, 2 cross attention
    for attention in maps:
        expected = safe_softmax(attention.scores.masked_fill(~attention.valid, float("-inf")))
        torch.testing.assert_close(attention.weights, expected, rtol=1e-5, atol=1e-6)


def test_analyze_model_reports_the_papers_measures_from_the_scores():
    model = llama("sdpa")
    analysis = analyze_model(model, inputs())
    first = analysis.maps[0]
    expected = paper_measures(first.scores, first.weights, first.valid)
    layer = analysis.layers[0]
    for key in ("paper_multimodality", "paper_sparsity"):
        per_head = [float(v) for v in expected[key]]
        assert layer[f"{key}_per_head"] == pytest.approx([round(v, 6) for v in per_head])
        assert layer[key] == pytest.approx(sum(per_head) / len(per_head))
        assert analysis.overall[key] == pytest.approx(sum(entry[key] for entry in analysis.layers) / 2)
        assert 0.0 <= analysis.overall[key] <= 1.0 and not math.isnan(analysis.overall[key])


def test_without_recording_the_scores_are_absent():
    maps, _ = collect_attention(llama("sdpa"), inputs(), record_scores=False)
    assert all(attention.scores is None for attention in maps)
