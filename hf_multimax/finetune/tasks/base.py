"""What differs between the fine-tuning scripts: one :class:`Task` per kind of model (this module holds the base class
and what all tasks share; one module per task beside it).

A task knows its model class, its tiny from-scratch configurations, its extra command-line flags, its embedded default
data, how to build its tokenizer or image processor, how to turn raw examples into model inputs, how to batch them,
and how to evaluate. Everything else (arguments, Accelerate, the loop, checkpoints, LoRA, saving) is shared in
:mod:`hf_multimax.finetune`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

__all__ = ["Task", "TINY_CONFIGS", "load_raw_datasets"]

#: Tiny from-scratch architectures (2 layers, width 64, 4 heads): seconds per epoch on a laptop CPU. Dropout is 0 so
#: that two runs from one seed differ only by their attention. ``--config_overrides`` changes any field.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(
        n_embd=64,
        n_inner=128,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    ),
    "t5": dict(
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        tie_word_embeddings=True,
    ),
    "bart": dict(
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    ),
    "marian": dict(
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        share_encoder_decoder_embeddings=True,
    ),
    "vit": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_channels=3,
    ),
    "deit": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_channels=3,
    ),
}


def _builder_for(path: str) -> str:
    if os.path.isdir(path):
        return "imagefolder"
    extension = path.rsplit(".", 1)[-1].lower()
    if extension in ("txt", "text"):
        return "text"
    if extension in ("jsonl", "json"):
        return "json"
    if extension in ("csv", "tsv"):
        return "csv"
    raise ValueError(
        f"cannot tell the format of {path!r}: use a .csv, .tsv, .json, .jsonl or .txt file (or an image folder)"
    )


def load_raw_datasets(
    embedded: Callable[[], datasets.Dataset],
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    validation_split_percentage: int = 5,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> datasets.DatasetDict:
    """``{"train", "validation"}`` splits from the Hub (``dataset_name``), local files, or ``embedded()`` (neither
    given: the task's embedded default), as Transformers' ``run_*`` examples accept them.

    Local files go through ``datasets.load_dataset`` with the builder their extension names (``txt`` → ``text``,
    ``csv``/``tsv`` → ``csv``, ``json``/``jsonl`` → ``json``, a folder → ``imagefolder``). Without a validation split,
    ``validation_split_percentage`` percent of the training data is held out (shuffled with ``seed``).
    """
    import datasets

    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, dataset_config_name)
    elif train_file is not None:
        builder = _builder_for(train_file)
        kwargs = {"delimiter": "\t"} if train_file.endswith(".tsv") else {}
        if builder == "imagefolder":
            data_files = {"train": os.path.join(train_file, "**")}
            if validation_file is not None:
                data_files["validation"] = os.path.join(validation_file, "**")
        else:
            data_files = {"train": train_file}
            if validation_file is not None:
                data_files["validation"] = validation_file
        raw = datasets.load_dataset(builder, data_files=data_files, **kwargs)
    else:
        if validation_file is not None:
            raise ValueError("--validation_file needs --train_file (or --dataset_name)")
        raw = datasets.DatasetDict({"train": embedded()})

    if "validation" not in raw:
        if "test" in raw:
            raw["validation"] = raw.pop("test")
        else:
            split = raw["train"].train_test_split(test_size=validation_split_percentage / 100, seed=seed)
            raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    raw = datasets.DatasetDict({"train": raw["train"], "validation": raw["validation"]})
    if max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(max_train_samples, len(raw["train"]))))
    if max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(max_eval_samples, len(raw["validation"]))))
    return raw


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
    #: True when the model inputs are token sequences of varying length (``--group_by_length`` applies).
    text_inputs: ClassVar[bool] = True

    # -- arguments ---------------------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the task's own flags."""

    # -- data --------------------------------------------------------------------------------------------------------
    def embedded_dataset(self) -> datasets.Dataset:
        """The task's embedded default data (:mod:`hf_multimax.data`) as a ``datasets.Dataset`` with the columns a Hub
        dataset of the same kind has."""
        raise NotImplementedError

    def load_raw(self, args: argparse.Namespace):
        """Train and validation splits: Hub dataset, local files or :meth:`embedded_dataset`."""
        return load_raw_datasets(
            self.embedded_dataset,
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

    @staticmethod
    def load_tokenizer(args: argparse.Namespace):
        """``--tokenizer_name``'s tokenizer, else ``--model_name_or_path``'s; a ``ValueError`` naming the flag that
        supplies one when it does not load (e.g. a model saved without its tokenizer)."""
        from transformers import AutoTokenizer

        name = args.tokenizer_name or args.model_name_or_path
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            flag = "--tokenizer_name" if args.tokenizer_name else "--model_name_or_path"
            raise ValueError(
                f"no tokenizer loads from {flag} {name} ({type(error).__name__}: {str(error).splitlines()[0]})"
                "; pass --tokenizer_name NAME_OR_PATH with the model's tokenizer"
            ) from error

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
        losses = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
        ).view(labels.shape)
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
