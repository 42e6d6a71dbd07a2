"""MultiMax under ``torch.compile`` and ``torch.export``: whole graphs (``fullgraph=True``) through the operators of
``hf_multimax.kernels.ops``, with eager's loss and gradients, for the model families that exercise padding (BERT),
position bias and cross attention (T5), images (ViT) and causal decoding (Llama).

Most tests compile with the ``aot_eager`` backend: it runs Dynamo (which refuses graph breaks under fullgraph) and
AOTAutograd (which traces forward and backward through the operators' fake implementations and registered
autograd), without Inductor's C++ code generation, which costs about a minute per model on this CPU. One test runs
Inductor itself end to end.
"""

import pytest
import torch
from families import BY_NAME, randomize_multimax
from torch._subclasses.fake_tensor import FakeTensorMode

import hf_multimax
from hf_multimax.kernels import multimax_attention, ops

COMPILED = [
    ("llama", {}),
    ("llama", {"multimax_output": True}),
    ("bert", {}),
    ("t5", {}),
    ("t5", {"multimax_output": True}),
    ("vit", {}),
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batch_with_labels(family):
    inputs = family.inputs()  # left padding for text models
    if family.kind == "vision":
        inputs["labels"] = torch.tensor([1, 3])
    elif family.kind == "encoder":
        inputs["labels"] = torch.tensor([0, 2])
    elif family.kind == "seq2seq":
        inputs["labels"] = inputs.pop("decoder_input_ids")
    else:
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {
        n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("name,flags", COMPILED, ids=[f"{n}-{'-'.join(f) or 'attention'}" for n, f in COMPILED])
def test_fullgraph_compile_gives_eager_loss_and_gradients(name, flags):
    family = BY_NAME[name]
    model = family.build("multimax", multimax_init="paper", **flags)  # eval mode: no dropout, same numbers twice
    randomize_multimax(model)
    inputs = batch_with_labels(family)
    eager_loss, eager_grads = loss_and_grads(model, inputs)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, grads = loss_and_grads(compiled, inputs)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == eager_grads.keys()
    multimax = [n for n in grads if "multimax_" in n]
    assert len(multimax) == 2 * (family.attention_modules + bool(flags.get("multimax_output")))
    if name == "t5":
        assert any("relative_attention_bias" in n for n in grads)  # the position bias's gradient flows through
    for n, g in grads.items():
        torch.testing.assert_close(g, eager_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_no_graph_breaks_where_sdpa_has_none():
    family = BY_NAME["llama"]
    for implementation in ("sdpa", "multimax"):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(family.build(implementation))(**family.inputs())
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), implementation


def test_inductor_compiles_training_end_to_end():
    family = BY_NAME["llama"]
    model = family.build("multimax", multimax_init="paper")
    randomize_multimax(model)
    inputs = batch_with_labels(family)
    eager_loss, eager_grads = loss_and_grads(model, inputs)
    loss, grads = loss_and_grads(torch.compile(model, fullgraph=True), inputs)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(g, eager_grads[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_torch_export_of_the_inference_forward(name):
    family = BY_NAME[name]
    model = family.build("multimax")
    randomize_multimax(model)
    inputs = dict(family.inputs(), use_cache=False)
    exported = torch.export.export(model, args=(), kwargs=inputs)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "hf_multimax.attention.default" in targets  # the operator, not its inner workings
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_static_cache_generation_with_a_compiled_forward_gives_the_eager_tokens():
    family = BY_NAME["llama"]
    model = family.build("multimax")
    randomize_multimax(model)
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(prompt, **kwargs)
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        compiled = model.generate(prompt, **kwargs)
    assert torch.equal(compiled, eager) and compiled.shape[1] == prompt.shape[1] + 6


def test_trainer_with_torch_compile_trains_a_multimax_model(tmp_path):
    from transformers import TrainingArguments

    family = BY_NAME["llama"]
    model = family.build("multimax").train()
    randomize_multimax(model)
    before = model.model.layers[0].self_attn.multimax.multimax_ts.detach().clone()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(4, 64, (8, 12))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        torch_compile=True,
        torch_compile_backend="aot_eager",
    )
    trainer = hf_multimax.MultiMaxTrainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.model.layers[0].self_attn.multimax.multimax_ts, before)


# ---------------------------------------------------------------------------------------------------------------------
# the operators themselves


def attention_inputs(device="cpu", requires_grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(requires_grad)  # noqa: E731
    q, k, v = make(2, 4, 7, 8), make(2, 2, 9, 8), make(2, 2, 9, 8)
    ranges, ts = make(4), make(4)
    bias = make(1, 4, 7, 9)
    mask = (torch.rand(2, 1, 7, 9, generator=g) > 0.3).to(device)
    return q, k, v, ranges, ts, bias, mask


def test_shapes_propagate_on_the_meta_device_and_under_fake_tensors():
    q, k, v, ranges, ts, bias, mask = attention_inputs("meta")
    out = multimax_attention(q, k, v, ranges, ts, attention_mask=mask, position_bias=bias)
    assert out.device.type == "meta" and out.shape == (2, 7, 4, 8) and out.dtype == torch.float32
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in attention_inputs()]
        out = multimax_attention(*fake[:5], attention_mask=fake[6], position_bias=fake[5], is_causal=True)
        assert out.shape == (2, 7, 4, 8)
    bf16 = attention_inputs("meta", dtype=torch.bfloat16)
    assert multimax_attention(*bf16[:5]).dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["mask+bias", "causal", "dropout", "float64"])
def test_opcheck_on_the_attention_operators(case):
    dtype = torch.float64 if case == "float64" else torch.float32
    q, k, v, ranges, ts, bias, mask = attention_inputs(requires_grad=True, dtype=dtype)
    if case != "mask+bias":
        bias = mask = None
    seed = torch.tensor(1234, dtype=torch.int64)
    dropout = 0.2 if case == "dropout" else 0.0
    forward_args = (q, k, v, ranges, ts, bias, mask, seed, 0.35, case == "causal", dropout, "auto")
    torch.library.opcheck(ops.attention, forward_args)
    out, stats = ops.attention(*forward_args)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in forward_args[:8]]
    backward_args = (
        torch.randn_like(out),
        *detached,
        out.detach(),
        stats.detach(),
        0.35,
        case == "causal",
        dropout,
        bias is not None,
        "auto",
    )
    torch.library.opcheck(ops.attention_backward, backward_args)


def test_opcheck_on_the_cross_entropy_operator():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 6, generator=g, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g, requires_grad=True)
    ranges, ts = (torch.randn(4, generator=g).requires_grad_() for _ in range(2))
    labels = torch.randint(0, 11, (10,), generator=g)
    labels[3] = -100
    args = (hidden, weight, bias, ranges, ts, labels, -100, 4, True, True, True, True, True, "auto")
    torch.library.opcheck(ops.linear_seglu_cross_entropy_op, args)


def test_bad_inputs_are_named_while_tracing_too():
    q, k, v, ranges, ts, _, _ = attention_inputs()
    with pytest.raises(TypeError, match=r"`query` has dtype torch.int64; MultiMax attention takes"):
        multimax_attention(q.long(), k, v, ranges, ts)
    with pytest.raises(ValueError, match=r"`attention_mask` of shape \(2, 1, 7, 5\) does not broadcast"):
        multimax_attention(q, k, v, ranges, ts, attention_mask=torch.ones(2, 1, 7, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`dropout_p` must be in \[0, 1\), got 1.5"):
        multimax_attention(q, k, v, ranges, ts, dropout_p=1.5)
    mode = FakeTensorMode()
    fake_q, fake_k, fake_v = mode.from_tensor(q), mode.from_tensor(q[:, :3]), mode.from_tensor(v)
    with mode, pytest.raises(ValueError, match="incompatible shapes"):
        multimax_attention(fake_q, fake_k, fake_v, mode.from_tensor(ranges), mode.from_tensor(ts))
