"""Tiny model families, built locally from configs (no hub access): one row per family, as PEFT's test tables do."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BartConfig,
    BertConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    T5Config,
    ViTConfig,
)

VOCAB = 64


@dataclass
class Family:
    name: str
    make_config: Callable[[], Any]
    auto: Any
    kind: str  # "causal", "encoder", "seq2seq", "vision"
    attention_modules: int  # attention modules that dispatch through the interface
    extra: dict = field(default_factory=dict)

    def config(self, **flags):
        config = self.make_config()
        for key, value in flags.items():
            setattr(config, key, value)
        return config

    def build(self, attn_implementation: str, seed: int = 0, **flags):
        torch.manual_seed(seed)
        return self.auto.from_config(self.config(**flags), attn_implementation=attn_implementation).eval()

    def inputs(self, batch: int = 2, seq: int = 9, seed: int = 1, padding: str | None = "left") -> dict:
        g = torch.Generator().manual_seed(seed)
        if self.kind == "vision":
            return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
        ids = torch.randint(4, VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if padding == "left":
            mask[0, :3] = 0
        elif padding == "right":
            mask[0, -3:] = 0
        out = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "seq2seq":
            out["decoder_input_ids"] = torch.randint(4, VOCAB, (batch, 5), generator=g)
        return out


def _llama_like(cls, **extra):
    return lambda: cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
        **extra,
    )


FAMILIES = [
    Family("llama", _llama_like(LlamaConfig), AutoModelForCausalLM, "causal", 2),
    Family("qwen2", _llama_like(Qwen2Config), AutoModelForCausalLM, "causal", 2),
    Family("mistral", _llama_like(MistralConfig, sliding_window=4), AutoModelForCausalLM, "causal", 2),
    Family("gemma", _llama_like(GemmaConfig, head_dim=8), AutoModelForCausalLM, "causal", 2),
    Family(
        "gpt2",
        lambda: GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            initializer_range=0.2,
        ),
        AutoModelForCausalLM,
        "causal",
        2,
    ),
    Family(
        "bert",
        lambda: BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            num_labels=3,
            initializer_range=0.2,
        ),
        AutoModelForSequenceClassification,
        "encoder",
        2,
    ),
    Family(
        "t5",
        lambda: T5Config(
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
        AutoModelForSeq2SeqLM,
        "seq2seq",
        6,
    ),
    Family(
        "bart",
        lambda: BartConfig(
            d_model=32,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
            init_std=0.2,
        ),
        AutoModelForSeq2SeqLM,
        "seq2seq",
        6,
    ),
    Family(
        "vit",
        lambda: ViTConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            num_channels=3,
            num_labels=5,
            initializer_range=0.2,
        ),
        AutoModelForImageClassification,
        "vision",
        2,
    ),
]
FAMILY_IDS = [f.name for f in FAMILIES]
BY_NAME = {f.name: f for f in FAMILIES}


def randomize_multimax(model, seed: int = 3, scale: float = 0.3) -> None:
    """Give every SegLU non-trivial values (ranges around the score range, slopes of both signs)."""
    import hf_multimax

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for seglu in hf_multimax.multimax_modules(model).values():
            seglu.multimax_ranges.copy_(torch.randn(seglu.multimax_ranges.shape, generator=g) * 0.5)
            seglu.multimax_ts.copy_(torch.randn(seglu.multimax_ts.shape, generator=g) * scale)


def clone_weights(source, target) -> None:
    """Copy the shared weights of ``source`` into ``target`` (non-MultiMax models ignore MultiMax parameters)."""
    state = {k: v for k, v in source.state_dict().items() if "multimax_" not in k}
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("multimax_" in key for key in missing), missing


def copy_config(config):
    return copy.deepcopy(config)
