"""Sequence-to-sequence translation (T5/BART/Marian style): sacreBLEU and chrF of beam-search translations."""

from __future__ import annotations

import argparse

import torch

from ...data import build_tokenizer, translation_pairs
from .base import Task

__all__ = ["TranslationTask", "load_sacrebleu"]


def load_sacrebleu():
    """sacreBLEU as an ``evaluate`` module, offline.

    ``evaluate.load("sacrebleu")`` fetches its script from the Hugging Face Hub and fails without network, so this
    loads :mod:`hf_multimax.sacrebleu_metric`, a local metric script with the same interface and outputs, computed by
    the ``sacrebleu`` package (``evaluate.load`` accepts a path to a local script).
    """
    import evaluate

    from .. import sacrebleu_metric

    return evaluate.load(sacrebleu_metric.__file__)


class TranslationTask(Task):
    """Sequence-to-sequence translation (T5/BART/Marian style); reports sacreBLEU of beam-search translations."""

    name = "translation"
    auto_class = "AutoModelForSeq2SeqLM"
    default_model_type = "t5"
    model_types = ("t5", "bart", "marian")
    metric = "bleu"
    greater_is_better = True
    extra_metrics = ("chrf",)
    validation_split_percentage = 10  # ~1,680 of the embedded pairs: BLEU on a few short strings is mostly noise
    peft_task_type = "SEQ_2_SEQ_LM"
    pipeline_tag = "translation"
    default_dataset = (
        "hf-multimax en_de.tsv: English-German UI strings from twelve PyPI packages' catalogs "
        "(BSD, MIT, Apache-2.0, Unicode licences)"
    )
    # As compare's translation default (README, "Choosing the defaults"): random batches of these pairs are ~90%
    # padding, and four epochs of batches of 64 are ~950 steps.
    scratch_defaults = {
        "learning_rate": 3e-3,
        "per_device_train_batch_size": 64,
        "num_train_epochs": 4,
        "group_by_length": True,
    }

    def embedded_dataset(self):
        """The embedded English→German pairs as a ``translation`` column of ``{"en", "de"}``."""
        import datasets

        return datasets.Dataset.from_dict({"translation": [{"en": en, "de": de} for en, de in translation_pairs()]})

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("translation")
        group.add_argument(
            "--source_lang",
            default="en",
            help="source language key (in the 'translation' column, or a column of that name in csv/json files)",
        )
        group.add_argument("--target_lang", default="de", help="target language key, as --source_lang")
        group.add_argument(
            "--source_prefix",
            default=None,
            help="text prepended to every source, e.g. 'translate English to German: ' for T5 checkpoints",
        )
        group.add_argument("--max_source_length", type=int, default=128, help="source sequences are truncated to this")
        group.add_argument(
            "--max_target_length",
            type=int,
            default=128,
            help="target sequences are truncated to this; also the generation limit in evaluation",
        )
        group.add_argument("--num_beams", type=int, default=4, help="beam width of the translations scored by BLEU")
        group.add_argument(
            "--vocab_size",
            type=int,
            default=1000,
            help="vocabulary size of the joint source/target byte-level BPE tokenizer built when none "
            "is given (smaller is closer to bytes: longer sequences, slower steps)",
        )

    def pairs(self, args, dataset) -> tuple[list[str], list[str]]:
        if "translation" in dataset.column_names:
            rows = dataset["translation"]
            return [r[args.source_lang] for r in rows], [r[args.target_lang] for r in rows]
        missing = {args.source_lang, args.target_lang} - set(dataset.column_names)
        if missing:
            raise ValueError(
                f"the data has neither a 'translation' column nor columns {sorted(missing)}; "
                f"columns: {dataset.column_names}"
            )
        return list(dataset[args.source_lang]), list(dataset[args.target_lang])

    def build_preprocessor(self, args, raw):
        if args.tokenizer_name or args.model_name_or_path:
            return self.load_tokenizer(args)
        sources, targets = self.pairs(args, raw["train"])
        return build_tokenizer(sources + targets, vocab_size=args.vocab_size, min_frequency=1)

    def preprocess(self, args, raw, tokenizer):
        prefix = args.source_prefix or ""

        def encode(examples):
            sources, targets = self.pairs(args, _Columns(examples))
            inputs = tokenizer([prefix + s for s in sources], max_length=args.max_source_length, truncation=True)
            labels = tokenizer(text_target=targets, max_length=args.max_target_length, truncation=True)
            inputs["labels"] = labels["input_ids"]
            return inputs

        processed = raw.map(encode, batched=True, remove_columns=raw["train"].column_names, desc="Tokenizing")
        return processed["train"], processed["validation"]

    def collator(self, args, tokenizer, model):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)

    def config_kwargs(self, args, tokenizer, raw):
        pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
        kwargs = dict(
            vocab_size=len(tokenizer),
            pad_token_id=pad,
            eos_token_id=eos,
            bos_token_id=tokenizer.bos_token_id,
            decoder_start_token_id=eos if args.model_type == "bart" else pad,
        )
        if args.model_type == "marian":
            kwargs["decoder_vocab_size"] = len(tokenizer)
        if args.model_type in ("bart", "marian"):
            kwargs["max_position_embeddings"] = max(args.max_source_length, args.max_target_length) + 2
            kwargs["forced_eos_token_id"] = eos
        return kwargs

    def evaluate(self, accelerator, model, dataloader, args, tokenizer):
        import numpy as np
        import sacrebleu

        metric = load_sacrebleu()
        losses, predictions, references = [], [], []
        unwrapped = accelerator.unwrap_model(model)
        model.eval()
        with torch.no_grad():
            for batch in dataloader:
                losses.append(accelerator.gather_for_metrics(self.loss_terms(model(**batch).logits, batch["labels"])))
                generated = unwrapped.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    num_beams=args.num_beams,
                    max_new_tokens=args.max_target_length,
                )
                generated = accelerator.pad_across_processes(generated, dim=1, pad_index=tokenizer.pad_token_id)
                labels = accelerator.pad_across_processes(batch["labels"], dim=1, pad_index=-100)
                generated, labels = accelerator.gather_for_metrics((generated, labels))
                labels = np.where(labels.cpu().numpy() != -100, labels.cpu().numpy(), tokenizer.pad_token_id)
                predictions += [
                    p.strip() for p in tokenizer.batch_decode(generated.cpu().numpy(), skip_special_tokens=True)
                ]
                references += [r.strip() for r in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        bleu = metric.compute(predictions=predictions, references=[[r] for r in references])["score"]
        # chrF as well: on short strings (many of the embedded pairs are one or two words) BLEU's 4-gram precision is
        # often zero, while character n-grams still tell a near miss from a wrong answer.
        chrf = sacrebleu.corpus_chrf(predictions, [references]).score
        return {"eval_loss": self.mean_loss(losses), "bleu": bleu, "chrf": chrf}


class _Columns:
    """A batch dict seen through the ``column_names`` / ``__getitem__`` interface of a ``datasets.Dataset``."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch
        self.column_names = list(batch)

    def __getitem__(self, key: str):
        return self.batch[key]
