"""What differs between the fine-tuning scripts: one :class:`Task` per kind of model.

A task knows its model class, its tiny from-scratch configurations, its extra command-line flags, how to build its
tokenizer or image processor, how to turn raw examples into model inputs, how to batch them, and how to evaluate.
Everything else (arguments, Accelerate, the loop, checkpoints, LoRA, saving) is shared in
:mod:`hf_multimax.finetune`.
"""

from __future__ import annotations

import argparse
import logging
import math
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import nn

from .data import build_image_processor, build_tokenizer, load_raw_datasets

logger = logging.getLogger(__name__)

__all__ = [
    "Task",
    "CausalLMTask",
    "TranslationTask",
    "ImageClassificationTask",
    "TASKS",
    "get_task",
    "TINY_CONFIGS",
    "load_sacrebleu",
]

#: Tiny from-scratch architectures (2 layers, width 64, 4 heads): seconds per epoch on a laptop CPU. Dropout is 0 so
#: that two runs from one seed differ only by their attention. ``--config_overrides`` changes any field.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True),
    "gpt2": dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 tie_word_embeddings=True),
    "t5": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
               tie_word_embeddings=True),
    "bart": dict(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, dropout=0.0, attention_dropout=0.0,
                 activation_dropout=0.0),
    "marian": dict(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2,
                   encoder_attention_heads=4, decoder_attention_heads=4, dropout=0.0, attention_dropout=0.0,
                   activation_dropout=0.0, share_encoder_decoder_embeddings=True),
    "vit": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=2,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_channels=3),
    "deit": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=2,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_channels=3),
}


def load_sacrebleu():
    """sacreBLEU as an ``evaluate`` module, offline.

    ``evaluate.load("sacrebleu")`` fetches its script from the Hugging Face Hub and fails without network, so this
    loads :mod:`hf_multimax.sacrebleu_metric`, a local metric script with the same interface and outputs, computed by
    the ``sacrebleu`` package (``evaluate.load`` accepts a path to a local script).
    """
    import evaluate

    from . import sacrebleu_metric

    return evaluate.load(sacrebleu_metric.__file__)


class Task:
    """Base class: the task-specific pieces of a fine-tuning script. Subclasses set the class attributes."""

    #: short name (``lm``, ``translation``, ``vit``), the ``--task`` of ``hf-multimax compare``.
    name: ClassVar[str]
    #: ``transformers`` auto class name, e.g. ``"AutoModelForCausalLM"``.
    auto_class: ClassVar[str]
    #: model type of the tiny from-scratch model (a key of :data:`TINY_CONFIGS`).
    default_model_type: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    #: the task metric reported by :meth:`evaluate` and whether higher is better.
    metric: ClassVar[str]
    greater_is_better: ClassVar[bool]
    #: further metrics :meth:`evaluate` reports (higher is better), shown next to ``metric`` by ``compare``.
    extra_metrics: ClassVar[tuple[str, ...]] = ()
    #: PEFT task type for LoRA (``None`` for a plain ``PeftModel``) and modules that are trained in full next to it.
    peft_task_type: ClassVar[str | None] = None
    lora_modules_to_save: ClassVar[tuple[str, ...]] = ()
    pipeline_tag: ClassVar[str]
    #: what the embedded default data set is (for model cards and reports).
    default_dataset: ClassVar[str]
    #: percentage of the training data held out when a data set has no validation split.
    validation_split_percentage: ClassVar[int] = 5
    #: learning rate, batch size and epochs when training the tiny model from scratch.
    scratch_defaults: ClassVar[dict[str, Any]] = {}
    #: True when position t predicts label t+1 (causal LMs shift the labels inside the model).
    shift_labels: ClassVar[bool] = False

    # -- arguments ---------------------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the task's own flags."""

    # -- data --------------------------------------------------------------------------------------------------------
    def load_raw(self, args: argparse.Namespace):
        """Train and validation splits: Hub dataset, local files or the embedded default."""
        return load_raw_datasets(
            self.name,
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            train_file=args.train_file,
            validation_file=args.validation_file,
            validation_split_percentage=args.validation_split_percentage,
            seed=args.seed,
            max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
        )

    def build_preprocessor(self, args: argparse.Namespace, raw) -> Any:
        """The tokenizer or image processor: from ``--tokenizer_name`` / ``--model_name_or_path`` or built locally."""
        raise NotImplementedError

    def preprocess(self, args: argparse.Namespace, raw, preprocessor: Any) -> tuple[Any, Any]:
        """Model-ready ``(train_dataset, eval_dataset)``."""
        raise NotImplementedError

    def collator(self, args: argparse.Namespace, preprocessor: Any, model: nn.Module):
        from transformers import default_data_collator

        return default_data_collator

    # -- model -------------------------------------------------------------------------------------------------------
    def config_kwargs(self, args: argparse.Namespace, preprocessor: Any, raw) -> dict[str, Any]:
        """Task-dependent config fields (vocabulary size, special tokens, labels, image size)."""
        return {}

    def pretrained_kwargs(self, args: argparse.Namespace, preprocessor: Any, raw) -> dict[str, Any]:
        """Extra ``from_pretrained`` keyword arguments (e.g. labels of a new classification head)."""
        return {}

    # -- evaluation --------------------------------------------------------------------------------------------------
    def evaluate(self, accelerator, model: nn.Module, dataloader, args: argparse.Namespace, preprocessor: Any) -> dict:
        """``{"eval_loss": ..., self.metric: ...}`` over the whole evaluation set (gathered across processes)."""
        raise NotImplementedError

    def loss_terms(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: the summed cross-entropy over its labelled positions and their number. Gathered with
        ``gather_for_metrics`` (which drops the examples repeated to even out the last batch across processes) they
        give the exact mean loss of the evaluation set, whatever the batch size and number of processes."""
        logits = logits.float()
        if self.shift_labels:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="none").view(labels.shape)
        if labels.dim() == 1:  # one label per example (classification)
            return losses, (labels != -100).float()
        return losses.sum(-1), (labels != -100).sum(-1).float()

    def label_count(self, labels: torch.Tensor) -> torch.Tensor:
        """Number of labelled positions in a batch (the tokens or examples its mean loss is taken over)."""
        return (labels[..., 1:] if self.shift_labels else labels).ne(-100).sum()

    @staticmethod
    def mean_loss(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """The token mean of the gathered :meth:`loss_terms`."""
        if not terms:
            return float("nan")
        return (torch.cat([t[0] for t in terms]).sum() / torch.cat([t[1] for t in terms]).sum().clamp(min=1)).item()

    def eval_loss(self, accelerator, model: nn.Module, dataloader) -> float:
        """Mean cross-entropy over every labelled position of the evaluation set (gathered across processes)."""
        terms = []
        model.eval()
        with torch.no_grad():
            for batch in dataloader:
                terms.append(accelerator.gather_for_metrics(self.loss_terms(model(**batch).logits, batch["labels"])))
        return self.mean_loss(terms)


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

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("language modelling")
        group.add_argument("--text_column_name", default=None,
                           help="column holding the text (default: 'text', else the first column)")
        group.add_argument("--block_size", type=int, default=128,
                           help="length of the training blocks the tokenized corpus is cut into")
        group.add_argument("--vocab_size", type=int, default=2000,
                           help="vocabulary size of the BPE tokenizer trained on the corpus when no tokenizer is given")

    def build_preprocessor(self, args, raw):
        from transformers import AutoTokenizer

        name = args.tokenizer_name or args.model_name_or_path
        if name:
            tokenizer = AutoTokenizer.from_pretrained(name)
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
            result = {k: [t[i: i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
            result["labels"] = result["input_ids"].copy()
            return result

        tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, desc="Tokenizing")
        tokenized = tokenized.remove_columns([c for c in tokenized["train"].column_names
                                              if c not in ("input_ids", "attention_mask")])
        grouped = tokenized.map(group_texts, batched=True, batch_size=1000, desc=f"Grouping into blocks of {block_size}")
        if len(grouped["validation"]) == 0:
            raise ValueError(f"the validation split is shorter than one block of {block_size} tokens; lower "
                             "--block_size or raise --validation_split_percentage")
        return grouped["train"], grouped["validation"]

    def config_kwargs(self, args, tokenizer, raw):
        kwargs = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
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


class TranslationTask(Task):
    """Sequence-to-sequence translation (T5/BART/Marian style); reports sacreBLEU of beam-search translations."""

    name = "translation"
    auto_class = "AutoModelForSeq2SeqLM"
    default_model_type = "t5"
    model_types = ("t5", "bart", "marian")
    metric = "bleu"
    greater_is_better = True
    extra_metrics = ("chrf",)
    validation_split_percentage = 10  # ~150 held-out pairs: BLEU on fewer short strings is mostly noise
    peft_task_type = "SEQ_2_SEQ_LM"
    pipeline_tag = "translation"
    default_dataset = "hf-multimax en_de.tsv: Django, Sphinx and CLDR English-German strings (BSD, Unicode licence)"
    scratch_defaults = {"learning_rate": 3e-3, "per_device_train_batch_size": 32, "num_train_epochs": 10}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("translation")
        group.add_argument("--source_lang", default="en", help="source language key (in the 'translation' column, "
                           "or a column of that name in csv/json files)")
        group.add_argument("--target_lang", default="de", help="target language key, as --source_lang")
        group.add_argument("--source_prefix", default=None,
                           help="text prepended to every source, e.g. 'translate English to German: ' for T5 checkpoints")
        group.add_argument("--max_source_length", type=int, default=128, help="source sequences are truncated to this")
        group.add_argument("--max_target_length", type=int, default=128,
                           help="target sequences are truncated to this; also the generation limit in evaluation")
        group.add_argument("--num_beams", type=int, default=4, help="beam width of the translations scored by BLEU")
        group.add_argument("--vocab_size", type=int, default=300,
                           help="vocabulary size of the joint source/target byte-level BPE tokenizer built when none "
                                "is given (300: nearly bytes, which lets a tiny model learn to copy the many names "
                                "that stay the same in German)")

    def pairs(self, args, dataset) -> tuple[list[str], list[str]]:
        if "translation" in dataset.column_names:
            rows = dataset["translation"]
            return [r[args.source_lang] for r in rows], [r[args.target_lang] for r in rows]
        missing = {args.source_lang, args.target_lang} - set(dataset.column_names)
        if missing:
            raise ValueError(f"the data has neither a 'translation' column nor columns {sorted(missing)}; "
                             f"columns: {dataset.column_names}")
        return list(dataset[args.source_lang]), list(dataset[args.target_lang])

    def build_preprocessor(self, args, raw):
        from transformers import AutoTokenizer

        name = args.tokenizer_name or args.model_name_or_path
        if name:
            return AutoTokenizer.from_pretrained(name)
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
        kwargs = dict(vocab_size=len(tokenizer), pad_token_id=pad, eos_token_id=eos, bos_token_id=tokenizer.bos_token_id,
                      decoder_start_token_id=eos if args.model_type == "bart" else pad)
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
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    num_beams=args.num_beams, max_new_tokens=args.max_target_length,
                )
                generated = accelerator.pad_across_processes(generated, dim=1, pad_index=tokenizer.pad_token_id)
                labels = accelerator.pad_across_processes(batch["labels"], dim=1, pad_index=-100)
                generated, labels = accelerator.gather_for_metrics((generated, labels))
                labels = np.where(labels.cpu().numpy() != -100, labels.cpu().numpy(), tokenizer.pad_token_id)
                predictions += [p.strip() for p in tokenizer.batch_decode(generated.cpu().numpy(), skip_special_tokens=True)]
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


class ImageClassificationTask(Task):
    """Image classification (ViT/DeiT style); reports accuracy."""

    name = "vit"
    auto_class = "AutoModelForImageClassification"
    default_model_type = "vit"
    model_types = ("vit", "deit")
    metric = "accuracy"
    greater_is_better = True
    peft_task_type = None
    lora_modules_to_save = ("classifier",)
    pipeline_tag = "image-classification"
    default_dataset = "scikit-learn load_digits 8x8 handwritten digits (BSD)"
    scratch_defaults = {"learning_rate": 3e-3, "per_device_train_batch_size": 64, "num_train_epochs": 10}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("image classification")
        group.add_argument("--image_column_name", default=None,
                           help="column holding the images (default: 'image' or 'img')")
        group.add_argument("--label_column_name", default="label", help="column holding the class labels")
        group.add_argument("--image_size", type=int, default=8,
                           help="side length images are resized to for a from-scratch model (8 = the digits' size)")

    def image_column(self, args, dataset) -> str:
        if args.image_column_name:
            return args.image_column_name
        for name in ("image", "img", "pixel_values"):
            if name in dataset.column_names:
                return name
        raise ValueError(f"no image column among {dataset.column_names}; pass --image_column_name")

    def labels(self, args, raw) -> list[str]:
        feature = raw["train"].features[args.label_column_name]
        if hasattr(feature, "names"):
            return list(feature.names)
        return [str(v) for v in sorted(set(raw["train"][args.label_column_name]))]

    def build_preprocessor(self, args, raw):
        from transformers import AutoImageProcessor

        if args.model_name_or_path:
            return AutoImageProcessor.from_pretrained(args.model_name_or_path)
        return build_image_processor(args.image_size)

    def preprocess(self, args, raw, processor):
        column = self.image_column(args, raw["train"])
        names = self.labels(args, raw)
        feature = raw["train"].features[args.label_column_name]
        to_id = None if hasattr(feature, "names") else {name: i for i, name in enumerate(names)}

        def transform(examples):
            images = [image.convert("RGB") for image in examples[column]]
            out = processor(images, return_tensors="pt")
            labels = examples[args.label_column_name]
            return {"pixel_values": out["pixel_values"],
                    "labels": [to_id[str(label)] for label in labels] if to_id else labels}

        train, evaluation = raw["train"], raw["validation"]
        train.set_transform(transform)
        evaluation.set_transform(transform)
        return train, evaluation

    def collator(self, args, processor, model):
        def collate(examples):
            return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                    "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long)}

        return collate

    def config_kwargs(self, args, processor, raw):
        names = self.labels(args, raw)
        return dict(image_size=args.image_size, num_labels=len(names), id2label=dict(enumerate(names)),
                    label2id={name: i for i, name in enumerate(names)})

    def pretrained_kwargs(self, args, processor, raw):
        kwargs = self.config_kwargs(args, processor, raw)
        kwargs.pop("image_size")
        return dict(kwargs, ignore_mismatched_sizes=True)

    def evaluate(self, accelerator, model, dataloader, args, processor):
        losses, correct, total = [], 0, 0
        model.eval()
        with torch.no_grad():
            for batch in dataloader:
                outputs = model(**batch)
                losses.append(accelerator.gather_for_metrics(self.loss_terms(outputs.logits, batch["labels"])))
                predictions, labels = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch["labels"]))
                correct += (predictions == labels).sum().item()
                total += labels.numel()
        return {"eval_loss": self.mean_loss(losses), "accuracy": correct / max(total, 1)}


TASKS: dict[str, Task] = {task.name: task for task in (CausalLMTask(), TranslationTask(), ImageClassificationTask())}


def get_task(name: str) -> Task:
    """The task registered under ``name`` (``lm``, ``translation`` or ``vit``)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None
