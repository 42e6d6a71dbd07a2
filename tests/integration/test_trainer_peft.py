"""MultiMax models under Transformers' Trainer / Seq2SeqTrainer (no weight decay on MultiMax parameters) and PEFT LoRA
(MultiMax parameters trained and saved with the adapter, reproduced on reload)."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

import hf_multimax
from hf_multimax import MultiMaxSeq2SeqTrainer, MultiMaxTrainer, data, finetune
from hf_multimax.finetune.tasks import CausalLMTask, load_sacrebleu
from hf_multimax.training import multimax_parameter_groups, multimax_parameter_names, output_multimax_parameter_names


@pytest.fixture(scope="module")
def lm_tokenizer():
    return data.build_tokenizer(data.lm_texts(), vocab_size=500)


@pytest.fixture(scope="module")
def lm_blocks(lm_tokenizer):
    ids = [i for text in data.lm_texts()[:200] for i in lm_tokenizer(text)["input_ids"]]
    blocks = [ids[i : i + 32] for i in range(0, len(ids) - 32, 32)][:64]
    return [{"input_ids": b, "labels": b} for b in blocks]


def tiny_llama(vocab_size: int, **flags) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        multimax_init="paper",
        **flags,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="multimax")


def seglu_values(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("multimax_ts", "multimax_ranges"))
    }


def assert_no_decay_on_multimax(trainer: Trainer, model) -> None:
    names = set(multimax_parameter_names(model))
    assert names
    decay = set(trainer.get_decay_parameter_names(model))
    assert not names & decay
    # A stock Trainer would decay them (`import hf_multimax` changes no Trainer): the subclass keeps them out.
    stock = set(Trainer.get_decay_parameter_names(trainer, model))
    assert {n for n in names if n.endswith("multimax_ts")} <= stock
    by_id = {id(p): n for n, p in model.named_parameters()}
    decays = set()
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            if by_id.get(id(param)) in names:
                assert group["weight_decay"] == 0.0
            decays.add(group["weight_decay"])
    assert trainer.args.weight_decay in decays  # other weights do decay


def test_trainer_fine_tunes_multimax_without_decaying_it(tmp_path, lm_tokenizer, lm_blocks):
    model = tiny_llama(len(lm_tokenizer))
    before = seglu_values(model)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = MultiMaxTrainer(model=model, args=args, train_dataset=lm_blocks)
    output = trainer.train()
    assert torch.isfinite(torch.tensor(output.training_loss))
    assert_no_decay_on_multimax(trainer, model)
    after = seglu_values(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # MultiMax parameters were trained

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="multimax")
    batch = torch.tensor([lm_blocks[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, model(batch).logits)


def test_seq2seq_trainer_with_generation(tmp_path):
    pairs = data.translation_pairs()[:96]
    tokenizer = data.build_tokenizer([s for pair in pairs for s in pair], vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=8,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=0,
        multimax_init="paper",
    )
    model = T5ForConditionalGeneration._from_config(config, attn_implementation="multimax")
    features = [dict(tokenizer(en), labels=tokenizer(de)["input_ids"]) for en, de in pairs]
    metric = load_sacrebleu()

    def compute_metrics(prediction):
        import numpy as np

        predictions, labels = prediction
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = [[r] for r in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {"bleu": metric.compute(predictions=decoded, references=references)["score"]}

    from transformers import DataCollatorForSeq2Seq

    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        learning_rate=1e-2,
        weight_decay=0.1,
        predict_with_generate=True,
        generation_num_beams=2,
        generation_max_length=8,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = MultiMaxSeq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=features,
        eval_dataset=features[:16],
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        compute_metrics=compute_metrics,
    )
    before = seglu_values(model)
    trainer.train()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_bleu"] <= 100.0 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert_no_decay_on_multimax(trainer, model)
    after = seglu_values(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def lora_args(**overrides) -> argparse.Namespace:
    values = dict(
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=None,
        weight_decay=0.1,
        multimax_learning_rate=None,
        learning_rate=1e-2,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def test_lora_round_trip_reproduces_the_fine_tuned_model(tmp_path, lm_tokenizer, lm_blocks):
    from peft import PeftModel

    base = tiny_llama(len(lm_tokenizer))
    base.save_pretrained(tmp_path / "base")
    initial = seglu_values(base)
    args = lora_args()
    model = finetune.apply_lora(CausalLMTask(), args, base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(n.endswith("multimax_ts") for n in trainable)
    assert not any("embed_tokens" in n or "mlp" in n for n in trainable)  # the rest is frozen

    optimizer = finetune.make_optimizer(model, args)
    groups = multimax_parameter_groups(model, weight_decay=0.1)
    assert {g["name"] for g in groups} == {"decay", "multimax"}
    model.train()
    for step in range(5):
        batch = torch.tensor([b["input_ids"] for b in lm_blocks[step * 4 : step * 4 + 4]])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model.save_pretrained(tmp_path / "adapter")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    saved_ts = {k: v for k, v in adapter.items() if k.endswith("multimax_ts")}
    assert len(saved_ts) == 2  # one SegLU per layer, saved with the adapter

    model.eval()
    batch = torch.tensor([lm_blocks[-1]["input_ids"]])
    with torch.no_grad():
        expected = model(batch).logits
    reloaded_base = LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="multimax")
    reloaded = PeftModel.from_pretrained(reloaded_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, expected)
    # The MultiMax parameters were trained (the base alone would give other outputs).
    trained = {
        n.replace("base_model.model.", "").replace(".modules_to_save.default", ""): p
        for n, p in seglu_values(reloaded).items()
        if "modules_to_save" in n
    }
    assert any(not torch.equal(trained[n], initial[n]) for n in trained)
    fresh_base = LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="multimax").eval()
    with torch.no_grad():
        assert not torch.allclose(fresh_base(batch).logits, expected, atol=1e-4)


def test_lora_keeps_output_multimax_in_its_own_group(lm_tokenizer):
    """Under PEFT's modules_to_save wrapper the output head's SegLU is still recognised as output-layer MultiMax,
    so clip_grad_norm_ clips it on its own."""
    model = finetune.apply_lora(CausalLMTask(), lora_args(), tiny_llama(len(lm_tokenizer), multimax_output=True))
    output = output_multimax_parameter_names(model)
    assert output and all("lm_head.multimax" in n for n in output)
    names = {g["name"]: g for g in multimax_parameter_groups(model)}
    assert set(names) >= {"multimax", "multimax_output"}
    x = torch.randint(0, len(lm_tokenizer), (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    norm = hf_multimax.clip_grad_norm_(model, 1.0)
    assert torch.isfinite(norm)
