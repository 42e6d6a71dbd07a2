"""Output-layer MultiMax (multimax_output=True): σ on the logits, in the loss and in the returned logits."""

import pytest
import torch
from families import BY_NAME, clone_weights, randomize_multimax
from transformers import AutoModel, AutoModelForSequenceClassification

import hf_multimax

CASES = ["llama", "gpt2", "t5", "bart", "bert", "vit"]


def labels_for(family, inputs):
    if family.kind == "causal":
        return inputs["input_ids"]
    if family.kind == "seq2seq":
        return inputs["decoder_input_ids"]
    return torch.tensor([1, 0])


@pytest.mark.parametrize("attention", ["sdpa", "multimax"])
@pytest.mark.parametrize("name", CASES)
def test_head_logits_and_loss_go_through_sigma(name, attention):
    family = BY_NAME[name]
    model = family.build(attention, multimax_output=True)
    randomize_multimax(model, scale=0.5)
    head = hf_multimax.modeling.output_head(model)
    head_seglu = [s for n, s in hf_multimax.multimax_modules(model).items() if model.get_submodule(n) is head.multimax]
    assert (
        len(head_seglu) == 1
        and len(hf_multimax.multimax_modules(model)) == 1 + (attention == "multimax") * family.attention_modules
    )
    plain = family.build(attention)
    clone_weights(model, plain)
    for n, s in hf_multimax.multimax_modules(plain).items():  # same attention parameters when attention is MultiMax
        s.load_state_dict(model.get_submodule(n).state_dict())
    inputs = family.inputs(padding="right")
    labels = labels_for(family, inputs)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        reference_logits = head_seglu[0](plain(**inputs).logits.float())
    torch.testing.assert_close(out.logits, reference_logits, atol=1e-5, rtol=1e-5)
    assert (out.logits - plain(**inputs).logits).abs().max() > 1e-3
    if family.kind in ("causal",):
        expected = torch.nn.functional.cross_entropy(
            reference_logits[:, :-1].reshape(-1, reference_logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
    elif family.kind == "seq2seq":
        expected = torch.nn.functional.cross_entropy(
            reference_logits.reshape(-1, reference_logits.shape[-1]), labels.reshape(-1)
        )
    else:
        expected = torch.nn.functional.cross_entropy(reference_logits, labels)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_head_parameters_train_save_and_reload(tmp_path):
    family = BY_NAME["llama"]
    model = family.build("multimax", multimax_output=True).train()
    randomize_multimax(model)
    inputs = family.inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.lm_head.multimax.multimax_ts.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "out")
    reloaded = type(model).from_pretrained(tmp_path / "out", attn_implementation="multimax")
    assert reloaded.config.multimax_output is True
    assert torch.equal(reloaded.lm_head.multimax.multimax_ts, model.lm_head.multimax.multimax_ts)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model.eval()(**inputs).logits)


def test_identity_output_layer_changes_nothing():
    family = BY_NAME["llama"]
    model = family.build("sdpa", multimax_output=True)
    plain = family.build("sdpa")
    clone_weights(model, plain)
    inputs = family.inputs(padding="right")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, plain(**inputs).logits, atol=0, rtol=0)


def test_base_model_without_head_is_left_alone():
    config = BY_NAME["llama"].config(multimax_output=True)
    model = AutoModel.from_config(config, attn_implementation="sdpa")
    assert not hf_multimax.multimax_modules(model)


def test_llama_sequence_classification_head():
    config = BY_NAME["llama"].config(multimax_output=True, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="multimax")
    assert model.score.multimax.multimax_ts.shape == (4,)
