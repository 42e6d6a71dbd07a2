"""Causal language modelling (Llama/GPT-2 style): perplexity on held-out blocks of the text."""

from __future__ import annotations

import argparse
import math
from itertools import chain

from ...data import build_tokenizer, lm_texts
from .base import Task

__all__ = ["CausalLMTask"]


class CausalLMTask(Task):
    """Causal language modelling (Llama/GPT-2 style); reports perplexity on the held-out blocks."""

    name = "lm"
    auto_class = "AutoModelForCausalLM"
    default_model_type = "llama"
    model_types = ("llama", "gpt2")
    metric = "perplexity"
    greater_is_better = False
    peft_task_type = "CAUSAL_LM"
    pipeline_tag = "text-generation"
    default_dataset = "CPython pydoc_data.topics (PSF licence)"
    shift_labels = True
    scratch_defaults = {"learning_rate": 3e-3, "per_device_train_batch_size": 16, "num_train_epochs": 3}

    def embedded_dataset(self):
        """CPython's documentation paragraphs as a ``text`` column."""
        import datasets

        return datasets.Dataset.from_dict({"text": lm_texts()})

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("language modelling")
        group.add_argument(
            "--text_column_name", default=None, help="column holding the text (default: 'text', else the first column)"
        )
        group.add_argument(
            "--block_size", type=int, default=128, help="length of the training blocks the tokenized corpus is cut into"
        )
        group.add_argument(
            "--vocab_size",
            type=int,
            default=2000,
            help="vocabulary size of the BPE tokenizer trained on the corpus when no tokenizer is given",
        )

    def build_preprocessor(self, args, raw):
        if args.tokenizer_name or args.model_name_or_path:
            tokenizer = self.load_tokenizer(args)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return tokenizer
        column = self.text_column(args, raw["train"])
        return build_tokenizer(raw["train"][column], vocab_size=args.vocab_size)

    def text_column(self, args, dataset) -> str:
        if args.text_column_name:
            return args.text_column_name
        return "text" if "text" in dataset.column_names else dataset.column_names[0]

    def preprocess(self, args, raw, tokenizer):
        column = self.text_column(args, raw["train"])
        block_size = min(args.block_size, getattr(tokenizer, "model_max_length", args.block_size) or args.block_size)

        def tokenize(examples):
            return tokenizer(examples[column])

        def group_texts(examples):
            # Concatenate all texts and cut them into blocks of block_size, dropping the remainder (as run_clm does).
            concatenated = {k: list(chain(*examples[k])) for k in examples}
            total = (len(concatenated["input_ids"]) // block_size) * block_size
            result = {k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
            result["labels"] = result["input_ids"].copy()
            return result

        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, desc="Tokenizing")
        tokenized = tokenized.remove_columns(
            [c for c in tokenized["train"].column_names if c not in ("input_ids", "attention_mask")]
        )
        grouped = tokenized.map(
            group_texts, batched=True, batch_size=1000, desc=f"Grouping into blocks of {block_size}"
        )
        if len(grouped["validation"]) == 0:
            raise ValueError(
                f"the validation split is shorter than one block of {block_size} tokens; lower "
                "--block_size or raise --validation_split_percentage"
            )
        return grouped["train"], grouped["validation"]

    def config_kwargs(self, args, tokenizer, raw):
        kwargs = dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if args.model_type == "gpt2":
            kwargs["n_positions"] = args.block_size
        else:
            kwargs["max_position_embeddings"] = args.block_size
        return kwargs

    def evaluate(self, accelerator, model, dataloader, args, preprocessor):
        loss = self.eval_loss(accelerator, model, dataloader)
        try:
            perplexity = math.exp(loss)
        except OverflowError:
            perplexity = float("inf")
        return {"eval_loss": loss, "perplexity": perplexity}
