"""Small, real, offline data for the examples and ``hf-multimax compare``, plus the loaders the scripts share.

Embedded defaults (no download, permissive licences):

* :func:`lm_texts`: paragraphs of CPython's ``pydoc_data.topics`` (the Python language reference topics that
  ``help()`` shows, ~460k characters, PSF licence), shipped with every Python.
* :func:`translation_pairs`: ~1,500 English→German UI strings and display names from Django's and Sphinx's gettext
  catalogs (BSD) and Babel's CLDR data (Unicode licence), shipped as ``hf_multimax/data/en_de.tsv`` (see
  ``NOTICE.md`` there; ``regenerate.py`` rebuilds it).
* :func:`digit_images`: scikit-learn's ``load_digits`` (1,797 8×8 handwritten digits, BSD; needs scikit-learn).

Any Hugging Face Hub dataset or local csv/json/txt file (or image folder) goes through ``datasets.load_dataset``
instead (:func:`load_raw_datasets`). Tokenizers are trained locally with the ``tokenizers`` library
(:func:`build_tokenizer`, cached on disk) and image processors are constructed locally (:func:`build_image_processor`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets
    from transformers import BaseImageProcessor, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

__all__ = [
    "TASKS",
    "DATA_DIR",
    "lm_texts",
    "translation_pairs",
    "digit_images",
    "build_tokenizer",
    "build_image_processor",
    "default_dataset",
    "load_raw_datasets",
    "cache_dir",
]

#: Task names used across the package: causal language modelling, translation, image classification.
TASKS = ("lm", "translation", "vit")
DATA_DIR = Path(__file__).resolve().parent / "data"
TRANSLATION_FILE = DATA_DIR / "en_de.tsv"
#: Special tokens of every tokenizer built here, in id order (pad = 0 matches T5's decoder start convention).
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>"}
_RULE = re.compile(r"^\s*([*=~^-])\1{2,}\s*$")  # reST heading underlines: "*****", "====="


def cache_dir() -> Path:
    """Where built tokenizers are cached: ``$HF_MULTIMAX_CACHE`` or ``~/.cache/hf_multimax``."""
    root = os.environ.get("HF_MULTIMAX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_multimax"
    return Path(root)


@functools.cache
def _lm_texts() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = [line.rstrip() for line in block.splitlines() if not _RULE.match(line)]
            text = "\n".join(lines).strip("\n")
            if text.strip():
                paragraphs.append(text)
    return tuple(paragraphs)


def lm_texts() -> list[str]:
    """Paragraphs of CPython's ``pydoc_data.topics`` (PSF licence), topics in sorted order, reST heading underlines
    removed, indentation of code blocks kept."""
    return list(_lm_texts())


@functools.cache
def _translation_pairs(sources: tuple[str, ...] | None) -> tuple[tuple[str, str], ...]:
    pairs = []
    with open(TRANSLATION_FILE, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["source", "en", "de"]:
            raise ValueError(f"{TRANSLATION_FILE} has an unexpected header {header}")
        for line in f:
            source, en, de = line.rstrip("\n").split("\t")
            if sources is None or source in sources:
                pairs.append((en, de))
    return tuple(pairs)


def translation_pairs(sources: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """English→German ``(en, de)`` pairs from ``hf_multimax/data/en_de.tsv``.

    Args:
        sources: keep only these origins among ``"django"`` (Django gettext catalogs, BSD-3-Clause), ``"sphinx"``
            (Sphinx gettext catalog, BSD-2-Clause) and ``"cldr"`` (territory and language names from Babel's CLDR
            data, Unicode licence); all by default.
    """
    return list(_translation_pairs(tuple(sources) if sources is not None else None))


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: ``(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the default image data set is scikit-learn's load_digits: `pip install scikit-learn` "
            "(or `pip install hf-multimax[examples]`), or pass --dataset_name / --train_dir"
        ) from error
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def build_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 2000,
    *,
    add_eos: bool = True,
    min_frequency: int = 2,
    cache: bool = True,
) -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it in ``PreTrainedTokenizerFast``.

    Byte-level BPE encodes any Unicode text without unknown tokens and decodes back to the original string, which
    sacreBLEU needs. Special tokens: ``<pad>`` (id 0), ``</s>`` (eos), ``<unk>``, ``<s>`` (bos). With ``add_eos``,
    every encoded sequence ends with ``</s>`` (seq2seq targets must, so that generation learns to stop; LM
    paragraphs are separated by it). The result is cached under :func:`cache_dir` by a hash of the texts and
    settings, so a second call (or another process) loads it instead of training.
    """
    import tokenizers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256()
    digest.update(json.dumps([vocab_size, add_eos, min_frequency, tokenizers.__version__]).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    path = cache_dir() / "tokenizers" / digest.hexdigest()[:16]
    if cache and (path / "tokenizer.json").is_file():
        logger.info("Loading cached tokenizer from %s", path)
        return PreTrainedTokenizerFast.from_pretrained(path)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS.values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if add_eos:
        eos = SPECIAL_TOKENS["eos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.token_to_id(eos))]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS, clean_up_tokenization_spaces=False)
    if cache:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        wrapped.save_pretrained(tmp)
        try:
            os.replace(tmp, path)  # atomic: concurrent processes never see a half-written tokenizer
        except OSError:  # another process won the race; keep its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("Trained a %d-token BPE tokenizer on %d texts, cached at %s", len(wrapped), len(texts), path)
    return wrapped


def build_image_processor(image_size: int = 8) -> "BaseImageProcessor":
    """A ViT image processor built locally: resize to ``image_size``², rescale to [0, 1], normalise with mean and
    std 0.5 on three (RGB) channels (convert grayscale images to RGB first, as the examples do)."""
    try:
        from transformers import ViTImageProcessorPil as Processor  # no torchvision needed
    except ImportError:  # pragma: no cover - older Transformers
        from transformers import ViTImageProcessor as Processor
    return Processor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def default_dataset(task: str) -> "datasets.Dataset":
    """The embedded default of ``task`` as a ``datasets.Dataset`` with the columns a Hub dataset of the same kind has:
    ``text`` (lm), ``translation`` = ``{"en", "de"}`` (translation), ``image`` (PIL) + ``label`` (ClassLabel) (vit)."""
    import datasets

    if task == "lm":
        return datasets.Dataset.from_dict({"text": lm_texts()})
    if task == "translation":
        return datasets.Dataset.from_dict({"translation": [{"en": en, "de": de} for en, de in translation_pairs()]})
    if task == "vit":
        from PIL import Image

        images, labels = digit_images()
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
        )
        pil = [Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L") for image in images]
        return datasets.Dataset.from_dict({"image": pil, "label": labels.tolist()}, features=features)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


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
    raise ValueError(f"cannot tell the format of {path!r}: use a .csv, .tsv, .json, .jsonl or .txt file (or an image folder)")


def load_raw_datasets(
    task: str,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    validation_split_percentage: int = 5,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> "datasets.DatasetDict":
    """``{"train", "validation"}`` splits for ``task``, from the Hub (``dataset_name``), local files, or the embedded
    default (neither given), as Transformers' ``run_*`` examples accept them.

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
        raw = datasets.DatasetDict({"train": default_dataset(task)})

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
