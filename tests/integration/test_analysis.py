"""Attention metrics on hand-built maps, weight collection from models, and `hf-multimax analyze` end to end."""

import json
import math

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, LlamaConfig, ViTConfig

import hf_multimax
from hf_multimax import analysis, data
from hf_multimax.analysis import (
    attention_metrics,
    collect_attention,
    entropy,
    modes,
    multimodality,
    residual_mass,
    sparsity,
    token_similarity,
    zero_fraction,
)
from hf_multimax.cli import main

hf_multimax.register_comparators()  # the comparator cases; registered on request only


def hand_built():
    """Two heads, two queries, four keys."""
    return torch.tensor(
        [
            [
                [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]],
                [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]],
            ]
        ]
    )


def test_metrics_on_a_hand_built_map():
    w = hand_built()
    torch.testing.assert_close(sparsity(w), torch.tensor([5 / 8, 0.0]))
    torch.testing.assert_close(zero_fraction(w), torch.tensor([5 / 8, 0.0]))
    torch.testing.assert_close(modes(w), torch.tensor([1.5, 2.5]))  # 0.1 is not above the 0.1 threshold
    torch.testing.assert_close(multimodality(w), torch.tensor([0.5, 0.7]))
    torch.testing.assert_close(residual_mass(w), torch.tensor([0.0, 0.15]))
    h_last = -(0.7 * math.log(0.7) + 0.3 * math.log(0.1))
    torch.testing.assert_close(entropy(w), torch.tensor([math.log(2) / 2, (math.log(4) + h_last) / 2]))
    metrics = attention_metrics(w)
    assert set(metrics) == {"sparsity", "zeros", "modes", "multimodality", "residual_mass", "entropy"}


def test_metrics_ignore_masked_entries_and_fully_masked_rows():
    w = torch.tensor([[[[0.5, 0.5, 0.0, 0.9], [0.3, 0.3, 0.3, 0.1]]]])
    valid = torch.tensor([[[[True, True, True, False], [False, False, False, False]]]])
    torch.testing.assert_close(sparsity(w, valid), torch.tensor([1 / 3]))
    torch.testing.assert_close(zero_fraction(w, valid), torch.tensor([1 / 3]))
    torch.testing.assert_close(modes(w, valid), torch.tensor([2.0]))
    torch.testing.assert_close(multimodality(w, valid), torch.tensor([1.0]))
    torch.testing.assert_close(entropy(w, valid), torch.tensor([math.log(2)]))


def test_multimodality_reproduces_the_papers_figure_1():
    softmax = torch.softmax(torch.tensor([[[[10.0, 8.0, -1.0]]]]), -1)
    assert abs(multimodality(softmax).item() - 0.238) < 1e-3
    assert multimodality(torch.tensor([[[[1.0, 0.0, 0.0]]]])).item() == 0.0


def test_token_similarity():
    hidden = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]])
    assert math.isclose(token_similarity(hidden), 1 / 3, rel_tol=1e-6)
    assert math.isclose(token_similarity(hidden, torch.tensor([[1, 1, 0]])), 1.0, rel_tol=1e-6)
    assert math.isclose(token_similarity(torch.ones(2, 5, 4)), 1.0, rel_tol=1e-6)  # fully over-smoothed


def llama(attn_implementation, **flags):
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=128,
        pad_token_id=0,
        initializer_range=0.2,
        **flags,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def padded_inputs():
    ids = torch.randint(4, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("implementation", ["sdpa", "multimax", "evsoftmax"])
def test_collect_attention_records_weights_and_masks(implementation):
    model = llama(implementation, multimax_init="paper")
    maps, outputs = collect_attention(model, padded_inputs())
    assert model.config._attn_implementation == implementation  # switched back after the run
    assert [m.name for m in maps] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    for m in maps:
        assert m.weights.shape == m.valid.shape == (2, 4, 7, 7)
        assert (m.valid[1] == causal).all() and not m.valid[0, :, :, :2].any()
        rows = m.valid.any(-1)  # eager SoftMax spreads fully masked rows uniformly; the metrics leave them out
        assert (m.weights[~m.valid & rows[..., None]] == 0).all()
        torch.testing.assert_close(m.weights.sum(-1)[rows], torch.ones(int(rows.sum())))
    assert len(outputs.hidden_states) == 3


def save_lm(path, implementation, tokenizer, **flags):
    model = llama(implementation, **flags)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return data.build_tokenizer(data.lm_texts()[:200], vocab_size=300, cache=False)


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_the_implementation_a_folder_was_trained_with(tmp_path, tokenizer):
    from hf_multimax.checkpoint import read_checkpoint

    assert read_checkpoint(save_lm(tmp_path / "a", "multimax", tokenizer)).attn_implementation == "multimax"
    assert read_checkpoint(save_lm(tmp_path / "b", "entmax_alpha", tokenizer)).attn_implementation == "entmax_alpha"
    # a parameter-free implementation leaves no trace in the weights; the folder's name says nothing either
    sparsemax = save_lm(tmp_path / "sparsemax", "sparsemax", tokenizer)
    assert read_checkpoint(sparsemax).attn_implementation is None
    # ... unless the fine-tuning scripts recorded it
    (sparsemax / "all_results.json").write_text(json.dumps({"attn_implementation": "sparsemax"}))
    assert read_checkpoint(sparsemax).attn_implementation == "sparsemax"
    assert read_checkpoint(save_lm(tmp_path / "c", "sdpa", tokenizer)).attn_implementation is None


def test_analyze_language_models_side_by_side(tmp_path, tokenizer):
    multimax = save_lm(tmp_path / "multimax", "multimax", tokenizer, multimax_init="paper", multimax_per_head=True)
    softmax = save_lm(tmp_path / "sdpa", "sdpa", tokenizer)
    out = tmp_path / "out"
    summary = analysis.analyze([multimax, softmax], out, num_samples=3, max_length=24)
    assert set(summary["images"]) == {
        "attention_histograms.png",
        "attention_metrics.png",
        "modulators_multimax.png",
        "simplex.png",
    }
    for name in summary["images"]:
        assert_png(out / name)
    saved = json.loads((out / "summary.json").read_text())
    assert [m["label"] for m in saved["models"]] == ["multimax", "sdpa"]
    first = saved["models"][0]
    assert first["attn_implementation"] == "multimax" and len(first["layers"]) == 2
    assert len(first["layers"][0]["sparsity_per_head"]) == 4
    assert len(first["modulators"]) == 2 and not saved["models"][1]["modulators"]
    assert 0.0 <= first["overall"]["sparsity"] <= 1.0 and first["overall"]["entropy"] > 0
    assert len(first["token_similarity"]) == 3
    md = (out / "summary.md").read_text()
    assert "## Overview" in md and "| multimax | multimax |" in md and "simplex.png" in md


def test_analyze_command_on_vision_models(tmp_path, capsys):
    paths = []
    for implementation in ("multimax", "sdpa"):
        config = ViTConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=8,
            patch_size=2,
            num_channels=3,
            num_labels=10,
            initializer_range=0.2,
        )
        torch.manual_seed(0)
        model = AutoModelForImageClassification.from_config(config, attn_implementation=implementation)
        path = tmp_path / implementation
        model.save_pretrained(path)
        data.build_image_processor(8).save_pretrained(path)
        paths.append(str(path))
    out = tmp_path / "vit_out"
    assert (
        main(["analyze", *paths, "--output_dir", str(out), "--num_samples", "4", "--labels", "MultiMax", "SoftMax"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "## Overview" in printed and "| MultiMax | multimax |" in printed
    for name in (
        "attention_histograms.png",
        "attention_metrics.png",
        "patch_similarity.png",
        "simplex.png",
        "modulators_MultiMax.png",
    ):
        assert_png(out / name)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["models"][0]["kind"] == "vision" and len(saved["models"][0]["token_similarity"]) == 3
    assert "patch_similarity.png" in (out / "summary.md").read_text()


def test_hf_multimax_is_imported_for_the_registrations():
    from transformers import AttentionInterface

    assert {"multimax", "multimax_eager"} <= set(AttentionInterface().valid_keys())


def test_modulator_curves_leave_a_half_precision_model_untouched():
    import torch
    from families import BY_NAME

    from hf_multimax.analysis.plots import modulator_curves

    model = BY_NAME["llama"].build("multimax").to(torch.bfloat16)
    curves = modulator_curves(model)
    assert len(curves) == 2 and all(y.dtype == torch.float32 for _, y in curves.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
