"""Loading a saved model for analysis and building inputs for it, offline.

:func:`load_for_analysis` reads the folder (:func:`hf_multimax.checkpoint.read_checkpoint`) to load it with the
attention implementation it was trained with; adapters are loaded onto their base model. Inputs come from the
folder's own tokenizer or image processor, else from ones built here: a byte-level BPE tokenizer trained on the
embedded data (or random token ids when the model's vocabulary is too small for one), the ViT image processor of the
fine-tuning scripts. Whatever is used is said in one log line.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import data
from ..checkpoint import Checkpoint, read_checkpoint
from ..integrations.transformers import register_named_comparators

logger = logging.getLogger(__name__)

__all__ = ["AnalysisInputError", "load_for_analysis", "model_kind", "text_inputs", "image_inputs"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
#: The smallest vocabulary a byte-level BPE tokenizer fits in: 256 bytes and 4 special tokens.
MIN_BPE_VOCAB = 260


class AnalysisInputError(ValueError):
    """A saved model cannot be analysed as asked (e.g. a tokenizer that does not load); the message names the missing
    piece and the flag that supplies it."""


def model_kind(model: nn.Module) -> str:
    """``"vision"`` (pixel inputs), ``"seq2seq"`` (encoder-decoder) or ``"text"``."""
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return "vision"
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise AnalysisInputError(
            f"{type(model).__name__} takes `{model.main_input_name}`, which analyze cannot build; it analyses text "
            "models (input_ids) and vision models (pixel_values)"
        )
    return "text"


def load_for_analysis(path: str | Path, attn_implementation: str | None = None) -> tuple[nn.Module, str, Checkpoint]:
    """Load a saved model (or a PEFT adapter on its base model) with ``attn_implementation``, else the one it was
    trained with (:attr:`Checkpoint.attn_implementation`; SoftMax ``"eager"`` when the folder does not tell).
    Returns ``(model in eval mode, kind, checkpoint)``."""
    import transformers

    checkpoint = read_checkpoint(path)
    implementation = attn_implementation or checkpoint.attn_implementation or "eager"
    register_named_comparators([implementation])
    model_class = getattr(transformers, checkpoint.architecture or "", None) or getattr(
        transformers, checkpoint.auto_class
    )
    flags = {name: value for name, value in checkpoint.flags.items() if name != "multimax_init"}
    if checkpoint.is_adapter:
        from peft import PeftModel

        if not checkpoint.base_model:
            raise AnalysisInputError(
                f"the adapter in {path} names no base model (adapter_config.json base_model_name_or_path is empty)"
            )
        try:
            base = model_class.from_pretrained(checkpoint.base_model, attn_implementation=implementation, **flags)
        except OSError as error:
            raise AnalysisInputError(
                f"the adapter's base model {checkpoint.base_model!r} cannot be loaded here "
                f"({error}); analyze needs it on disk or in the local Hub cache"
            ) from error
        model = PeftModel.from_pretrained(base, str(path)).eval()
    else:
        model = model_class.from_pretrained(str(path), attn_implementation=implementation).eval()
    return model, model_kind(model), checkpoint


def _spread(items: Sequence, n: int) -> list:
    """``n`` items spread evenly over ``items`` (deterministic)."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _vocab_size(model: nn.Module) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        return int(embeddings.num_embeddings)
    size = getattr(model.config, "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def _tokenizer(path: Path, checkpoint: Checkpoint, model: nn.Module, kind: str, tokenizer_name: str | None, label: str):
    """The tokenizer to encode with: ``tokenizer_name``, the folder's own, or a BPE trained on the embedded data
    (``None``: use random token ids)."""
    from transformers import AutoTokenizer

    if tokenizer_name is not None:
        try:
            return AutoTokenizer.from_pretrained(tokenizer_name)
        except (OSError, ValueError) as error:
            raise AnalysisInputError(
                f"--tokenizer {tokenizer_name!r} could not be loaded ({error}); pass a folder "
                "with a saved tokenizer or a Hub name available offline"
            ) from error
    source = checkpoint.base_model if checkpoint.is_adapter and not checkpoint.has_tokenizer else str(path)
    if checkpoint.has_tokenizer or checkpoint.is_adapter:
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            logger.info("could not load the tokenizer of %s (%s)", source, error)
    vocab = _vocab_size(model)
    if vocab is not None and vocab >= MIN_BPE_VOCAB:
        texts = (
            [en for en, _ in data.translation_pairs()] + [de for _, de in data.translation_pairs()]
            if kind == "seq2seq"
            else data.lm_texts()
        )
        tokenizer = data.build_tokenizer(
            texts, vocab_size=min(vocab, 2000), min_frequency=1 if kind == "seq2seq" else 2
        )
        logger.warning(
            "%s has no tokenizer: using a byte-level BPE tokenizer of %d tokens trained on the embedded data "
            "(pass --tokenizer NAME_OR_PATH for the model's own)",
            label,
            len(tokenizer),
        )
        return tokenizer
    logger.warning(
        "%s has no tokenizer and a vocabulary of %s tokens, too small for one built here: using random "
        "token ids (pass --tokenizer NAME_OR_PATH for real text)",
        label,
        vocab,
    )
    return None


def _random_ids(model: nn.Module, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    vocab = _vocab_size(model)
    if not vocab:
        raise AnalysisInputError(
            f"{type(model).__name__} has no tokenizer and no vocabulary size to draw token ids "
            "from; pass --tokenizer NAME_OR_PATH"
        )
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def text_inputs(
    path: str | Path,
    checkpoint: Checkpoint,
    model: nn.Module,
    kind: str,
    texts: Sequence[str] | None,
    num_samples: int,
    max_length: int,
    tokenizer_name: str | None = None,
    label: str = "the model",
) -> tuple[dict[str, torch.Tensor], str]:
    """Tokenised inputs for a text model and a description of them: ``texts`` (or the embedded defaults: Python
    documentation paragraphs for LMs and encoders, English→German pairs for seq2seq models) through
    :func:`_tokenizer`'s choice."""
    tokenizer = _tokenizer(Path(path), checkpoint, model, kind, tokenizer_name, label)
    targets = None
    if texts is None:
        if kind == "seq2seq":
            pairs = _spread(data.translation_pairs(), num_samples)
            texts, targets = [en for en, _ in pairs], [de for _, de in pairs]
            source = "English→German pairs"
        else:
            texts = _spread([t for t in data.lm_texts() if len(t) > 200], num_samples)
            source = "Python documentation paragraphs"
    else:
        texts = list(texts)[:num_samples]
        source = "your texts"
    if tokenizer is None:
        inputs: dict[str, Any] = {"input_ids": _random_ids(model, num_samples, max_length)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if kind == "seq2seq":
            inputs["decoder_input_ids"] = _random_ids(model, num_samples, max(2, max_length // 2), seed=1)
        return inputs, f"{num_samples} random token sequences of {max_length} tokens"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    inputs = dict(tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length))
    vocab = _vocab_size(model)
    if vocab is not None and int(inputs["input_ids"].max()) >= vocab:
        raise AnalysisInputError(
            f"the tokenizer gives token ids up to {int(inputs['input_ids'].max())} but the model "
            f"has {vocab}; pass --tokenizer NAME_OR_PATH with the model's own tokenizer"
        )
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        inputs.pop("token_type_ids", None)
    if kind == "seq2seq":
        labels = tokenizer(
            text_target=list(targets or texts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )["input_ids"]
        if hasattr(model, "prepare_decoder_input_ids_from_labels"):
            inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        else:
            inputs["decoder_input_ids"] = labels
    return inputs, f"{inputs['input_ids'].shape[0]} texts ({source}, at most {max_length} tokens)"


def image_inputs(
    path: str | Path,
    checkpoint: Checkpoint,
    model: nn.Module,
    image_dir: str | Path | None,
    num_samples: int,
    label: str = "the model",
) -> tuple[dict[str, torch.Tensor], str]:
    """Pixel values for a vision model and a description of them: images from ``image_dir`` (or scikit-learn's digits,
    one per class first) through the folder's image processor (or :func:`hf_multimax.data.build_image_processor`)."""
    import numpy as np
    from PIL import Image

    if image_dir is not None:
        folder = Path(image_dir)
        if not folder.is_dir():
            raise AnalysisInputError(f"--image_dir {image_dir} is not a folder")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise AnalysisInputError(f"--image_dir {image_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        images = [Image.open(p) for p in files[:num_samples]]
        source = str(image_dir)
    else:
        pixels, labels = data.digit_images()
        by_class = [np.flatnonzero(labels == c) for c in range(10)]  # one digit of each class, then the next ones
        order = [int(by_class[i % 10][i // 10]) for i in range(num_samples)]
        images = [Image.fromarray(np.round(pixels[i] * 255).astype(np.uint8), mode="L") for i in order]
        source = "scikit-learn's digits"
    channels = getattr(model.config, "num_channels", 3)
    images = [image.convert("RGB" if channels == 3 else "L") for image in images]
    processor = None
    if checkpoint.has_image_processor:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as error:
            logger.info("could not load the image processor of %s (%s)", path, error)
    if processor is None:
        size = getattr(model.config, "image_size", 8)
        processor = data.build_image_processor(size)
        logger.warning(
            "%s has no image processor: resizing to %d×%d with mean and std 0.5 (the fine-tuning scripts' processor)",
            label,
            size,
            size,
        )
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixel_values}, f"{pixel_values.shape[0]} images from {source}"
