"""Small, real, offline data that ships with Python or hf-multimax, and the tokenizers and image processors built on it
locally: the defaults of the fine-tuning scripts, ``hf-multimax compare`` and ``hf-multimax analyze``.

Embedded defaults (no download, permissive licences):

* :func:`lm_texts`: paragraphs of CPython's ``pydoc_data.topics`` (the Python language reference topics that
  ``help()`` shows, ~460k characters, PSF licence), shipped with every Python.
* :func:`translation_pairs`: 16,823 English→German UI strings, messages and display names translated by people for
  twelve packages on PyPI (Django, Sphinx, CLDR via Babel, Wagtail, django-oscar, django CMS, django-allauth, OpenStack
  Horizon, Indico, Apache Superset, Kolibri, JupyterLab; BSD, MIT, Apache-2.0 and Unicode licences), shipped as
  ``hf_multimax/data/en_de.tsv`` (origins and licence texts in ``NOTICE.md`` and ``licenses/`` there;
  ``regenerate.py`` rebuilds both).
* :func:`digit_images`: scikit-learn's ``load_digits`` (1,797 8×8 handwritten digits, BSD; needs scikit-learn).

Each fine-tuning task turns them into a ``datasets.Dataset`` (:mod:`hf_multimax.finetune.tasks`); Hub datasets and
local files go through ``datasets.load_dataset`` there. Tokenizers are trained locally with the ``tokenizers`` library
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
    from transformers import BaseImageProcessor, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_DIR",
    "lm_texts",
    "translation_pairs",
    "TRANSLATION_SOURCES",
    "digit_images",
    "build_tokenizer",
    "build_image_processor",
    "cache_dir",
]

DATA_DIR = Path(__file__).resolve().parent
TRANSLATION_FILE = DATA_DIR / "en_de.tsv"
#: The origins of the pairs in ``en_de.tsv`` (its ``source`` column), in the priority order of ``regenerate.py``;
#: ``NOTICE.md`` says where each comes from and ``licenses/<source>/`` holds its licence texts.
TRANSLATION_SOURCES = (
    "django",
    "sphinx",
    "cldr",
    "wagtail",
    "oscar",
    "djangocms",
    "allauth",
    "horizon",
    "indico",
    "superset",
    "kolibri",
    "jupyterlab",
)
#: Special tokens of every tokenizer built here, in id order (pad = 0 matches T5's decoder start convention).
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>"}
_RULE = re.compile(r"^\s*([*=~^-])\1{2,}\s*$")  # reST heading underlines: "*****", "====="


def cache_dir() -> Path:
    """Where built tokenizers are cached: ``$HF_MULTIMAX_CACHE`` or ``~/.cache/hf_multimax``."""
    root = (
        os.environ.get("HF_MULTIMAX_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_multimax"
    )
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
        sources: keep only these origins (the ``source`` column; :data:`TRANSLATION_SOURCES`), e.g. ``["django",
            "sphinx", "cldr"]`` for the 1,546 pairs of earlier releases; all by default. An unknown name raises
            ``ValueError`` naming it.
    """
    if sources is not None:
        unknown = sorted(set(sources) - set(TRANSLATION_SOURCES))
        if unknown:
            raise ValueError(f"sources: unknown origin(s) {unknown}; expected some of {list(TRANSLATION_SOURCES)}")
    return list(_translation_pairs(tuple(sources) if sources is not None else None))


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: ``(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the default image data set is scikit-learn's load_digits: `pip install scikit-learn` "
            "(or `pip install 'hf-multimax[train]'`), or pass --dataset_name / --train_dir"
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
) -> PreTrainedTokenizerFast:
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


def build_image_processor(image_size: int = 8) -> BaseImageProcessor:
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
