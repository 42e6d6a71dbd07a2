"""Optimizer habits: MultiMax parameters without weight decay (our groups and Trainer's), clipping of output-layer
MultiMax (separate group, 1/sqrt(V) scaling, or global)."""

import math

import pytest
import torch
from families import BY_NAME, randomize_multimax
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import hf_multimax
from hf_multimax import MultiMaxTrainer
from hf_multimax.integrations import trainer as trainer_hooks
from hf_multimax.training import multimax_parameter_names, output_multimax_parameter_names


def test_parameter_groups_exclude_multimax_from_decay():
    model = BY_NAME["llama"].build("multimax", multimax_output=True)
    groups = {g["name"]: g for g in hf_multimax.multimax_parameter_groups(model, weight_decay=0.1, multimax_lr=1e-2)}
    assert set(groups) == {"decay", "no_decay", "multimax", "multimax_output"}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    params = dict(model.named_parameters())
    assert ids["multimax"] == {id(params[n]) for n in multimax_parameter_names(model)} - ids["multimax_output"]
    assert ids["multimax_output"] == {
        id(params["lm_head.multimax.multimax_ranges"]),
        id(params["lm_head.multimax.multimax_ts"]),
    }
    assert groups["decay"]["weight_decay"] == 0.1 and groups["multimax"]["weight_decay"] == 0.0
    assert groups["multimax"]["lr"] == 1e-2
    assert id(params["model.layers.0.self_attn.q_proj.weight"]) in ids["decay"]
    assert id(params["model.norm.weight"]) in ids["no_decay"]
    # every trainable parameter lands in exactly one group, and AdamW accepts them
    assert sum(len(v) for v in ids.values()) == len(params)
    torch.optim.AdamW(hf_multimax.multimax_parameter_groups(model, weight_decay=0.1), lr=1e-3)


@pytest.mark.parametrize("how", ["subclass", "patch_trainer"])
def test_trainer_leaves_multimax_out_of_weight_decay(tmp_path, how):
    model = BY_NAME["llama"].build("multimax")
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, report_to=[])
    if how == "subclass":
        trainer = MultiMaxTrainer(model=model, args=args)
    else:  # for code that cannot change its Trainer class: patch a class in place, then undo it

        class ThirdPartyTrainer(Trainer):
            pass

        assert hf_multimax.patch_trainer(ThirdPartyTrainer) is ThirdPartyTrainer
        trainer = ThirdPartyTrainer(model=model, args=args)
    decayed = set(trainer.get_decay_parameter_names(model))
    assert "model.layers.0.self_attn.q_proj.weight" in decayed
    assert not decayed & set(multimax_parameter_names(model))
    optimizer = trainer.create_optimizer()
    for group in optimizer.param_groups:
        if any(p is model.model.layers[0].self_attn.multimax.multimax_ts for p in group["params"]):
            assert group["weight_decay"] == 0.0
    if how == "patch_trainer":
        hf_multimax.unpatch_trainer(ThirdPartyTrainer)
        assert "get_decay_parameter_names" not in ThirdPartyTrainer.__dict__
        assert set(multimax_parameter_names(model)) & set(trainer.get_decay_parameter_names(model))


def test_import_changes_no_trainer():
    """`import hf_multimax` leaves transformers.Trainer as Transformers wrote it."""
    import inspect

    for name in ("get_decay_parameter_names", "_clip_grad_norm"):
        method = getattr(Trainer, name)
        assert inspect.getmodule(method).__name__ == "transformers.trainer"
        assert not hasattr(method, "__wrapped__")
    assert trainer_hooks.check_trainer_compatibility() == []


def test_trainer_trains_a_multimax_model(tmp_path):
    family = BY_NAME["llama"]
    model = family.build("multimax").train()
    randomize_multimax(model)
    before = model.model.layers[1].self_attn.multimax.multimax_ts.detach().clone()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(4, 64, (8, 12))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
    )
    result = MultiMaxTrainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.model.layers[1].self_attn.multimax.multimax_ts, before)


def test_clip_grad_norm_clips_output_multimax_on_its_own():
    model = BY_NAME["llama"].build("multimax", multimax_output=True)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    names = set(output_multimax_parameter_names(model))
    for name, p in model.named_parameters():
        if name in names:
            p.grad = torch.full_like(p, 1000.0)
    total = hf_multimax.clip_grad_norm_(model, max_norm=1.0)
    main_count = sum(p.numel() for n, p in model.named_parameters() if n not in names)
    torch.testing.assert_close(total, torch.tensor(float(main_count) ** 0.5))  # norm of the main group only
    head = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n in names])
    torch.testing.assert_close(head.norm(), torch.tensor(1.0), atol=1e-4, rtol=0)
    body = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n not in names])
    torch.testing.assert_close(body.norm(), torch.tensor(1.0), atol=1e-4, rtol=0)


def output_multimax_llama(vocab_size: int, logit_scale: float, backward: bool = True) -> LlamaForCausalLM:
    """A tiny LM with output MultiMax whose logits are ``logit_scale`` times larger than at initialisation (a trained
    LM's logits spread over tens of units), with gradients from one real batch (``backward``)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        multimax_init="paper",
        multimax_output=True,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation="multimax")
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    if backward:
        ids = torch.randint(0, vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
    return model


def grads_by_group(model) -> tuple[torch.Tensor, torch.Tensor]:
    names = set(output_multimax_parameter_names(model))

    def flat(keep):
        return torch.cat(
            [p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None and keep(n in names)]
        )

    return flat(lambda is_out: not is_out), flat(lambda is_out: is_out)


@pytest.mark.parametrize("mode", ["separate", "scaled", "global"])
def test_output_clip_modes_on_real_gradients(mode):
    """With large logits the output σ gradient outweighs the whole rest of the model; global clipping then shrinks
    every other update by that factor, while the two remedies leave it (nearly) as clipping the rest alone would."""
    max_norm, vocab = 1.0, 512
    model = output_multimax_llama(vocab, logit_scale=30)
    main, out = grads_by_group(model)
    main_norm, out_norm = main.norm(), out.norm()
    assert out_norm > 3 * main_norm  # the situation the remedies are for

    returned = hf_multimax.clip_grad_norm_(model, max_norm, output_clip=mode)
    main_after, out_after = grads_by_group(model)
    main_factor = (main_after.norm() / main_norm).item()
    alone = min(1.0, max_norm / main_norm.item())  # what clipping the rest of the model alone would do
    if mode == "separate":
        assert returned.item() == pytest.approx(main_norm.item(), rel=1e-5)
        assert main_factor == pytest.approx(alone, rel=1e-4)
        assert out_after.norm().item() == pytest.approx(min(max_norm, out_norm.item()), rel=1e-4)
    elif mode == "scaled":
        expected = math.sqrt(main_norm.item() ** 2 + out_norm.item() ** 2 / vocab)
        assert returned.item() == pytest.approx(expected, rel=1e-5)
        assert main_factor == pytest.approx(max_norm / expected, rel=1e-4)
        assert main_factor > 0.5 * alone  # the σ gradient no longer dominates the global norm
    else:
        expected = math.sqrt(main_norm.item() ** 2 + out_norm.item() ** 2)
        assert returned.item() == pytest.approx(expected, rel=1e-5)
        assert main_factor == pytest.approx(max_norm / expected, rel=1e-4)
        assert main_factor < alone / 3  # every other update shrunk by the σ gradient
    # One factor per group: directions are kept.
    torch.testing.assert_close(main_after / main_after.norm(), main / main_norm)


@pytest.mark.parametrize("mode", ["separate", "scaled", "global"])
def test_output_clip_without_output_multimax_is_the_global_clip(mode):
    model = BY_NAME["llama"].build("multimax")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    count = sum(p.numel() for p in model.parameters())
    norm = hf_multimax.clip_grad_norm_(model, 1.0, output_clip=mode)
    torch.testing.assert_close(norm, torch.tensor(float(count) ** 0.5))
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    torch.testing.assert_close(total, torch.tensor(1.0), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "mode,how",
    [("separate", "argument"), ("global", "argument"), ("separate", "default"), ("global", "deprecated setter")],
)
def test_trainer_clips_output_multimax_like_clip_grad_norm(mode, how, tmp_path):
    """MultiMaxTrainer's clipping goes through clip_grad_norm_ for models with output-layer MultiMax: with "separate"
    (the default) each group ends at max_grad_norm, with "global" (Trainer's own) the σ gradient squeezes the rest."""
    from transformers import TrainerCallback

    from hf_multimax.training import set_trainer_output_clip

    class Record(TrainerCallback):
        norms = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.norms.append(tuple(g.norm().item() for g in grads_by_group(model)))

    model = output_multimax_llama(512, logit_scale=30, backward=False)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 512, (4, 32))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        learning_rate=1e-3,
    )
    record = Record()
    Record.norms = []
    try:
        if how == "argument":
            trainer = MultiMaxTrainer(
                model=model, args=args, train_dataset=data, callbacks=[record], multimax_output_clip=mode
            )
        else:
            if how == "deprecated setter":
                with pytest.warns(FutureWarning, match="multimax_output_clip"):
                    set_trainer_output_clip(mode)
            trainer = MultiMaxTrainer(model=model, args=args, train_dataset=data, callbacks=[record])
        trainer.train()
    finally:
        hf_multimax.training.clipping.set_default_output_clip("separate")
    ((main, out),) = record.norms
    if mode == "separate":
        assert main == pytest.approx(1.0, rel=1e-3) and out == pytest.approx(1.0, rel=1e-3)
    else:
        assert math.hypot(main, out) == pytest.approx(1.0, rel=1e-3) and main < 0.5


def test_output_clip_rejects_unknown_mode():
    model = BY_NAME["llama"].build("multimax", multimax_output=True)
    with pytest.raises(
        ValueError, match=r"`output_clip` must be one of \('separate', 'scaled', 'global'\), got 'sqrt'"
    ):
        hf_multimax.clip_grad_norm_(model, 1.0, output_clip="sqrt")
    with pytest.raises(ValueError, match=r"`output_clip` must be one of .*, got 'none'"):
        MultiMaxTrainer(
            model=model, args=TrainingArguments(output_dir="unused", report_to=[]), multimax_output_clip="none"
        )


def test_other_learnable_attention_parameters_skip_weight_decay_too(tmp_path):
    model = BY_NAME["llama"].build("entmax_alpha")
    names = set(multimax_parameter_names(model))
    assert names == {f"model.layers.{i}.self_attn.entmax_alpha.pre_alpha" for i in range(2)}
    groups = {g["name"]: g for g in hf_multimax.multimax_parameter_groups(model, weight_decay=0.1)}
    assert {id(p) for p in groups["multimax"]["params"]} == {id(dict(model.named_parameters())[n]) for n in names}
    trainer = MultiMaxTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, report_to=[])
    )
    assert not set(trainer.get_decay_parameter_names(model)) & names
