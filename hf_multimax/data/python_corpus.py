"""A large, real, offline text corpus on any machine with Python: the source of its standard library and installed
packages, built deterministically from a documented list (:data:`PYTHON_SOURCES`).

Every Python installation carries hundreds of MB of permissively licensed text (code, docstrings and comments) that
needs no network: the standard library (PSF licence) and packages such as torch, Transformers, NumPy, SciPy, pandas,
scikit-learn, JAX. :func:`build_python_corpus` reads the ``.py`` files of the listed sources that are installed,
reports the ones that are not, drops files that are not UTF-8, empty, over a size limit or exact duplicates of a
file read before, and holds out whole directories (a package's modules stay together, so a held-out file has no
sibling in training) for evaluation. Everything is in a fixed order (sources as listed, paths sorted; held-out
directories by a hash of their names), so the same installation always gives the same corpus, and
:attr:`PythonCorpus.sha256` identifies it. :func:`encode_texts` turns the texts into one token array (each file ends
with the tokenizer's end-of-sequence token).

The licence of each source is the one its project states for its own code (``licence``); the licence its installed
metadata declares is recorded beside it as found (``licence_metadata``), as is its version. Packages also ship code
vendored from other projects; it comes with them, under the licences they ship (all permissive for the listed
sources).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CorpusSource",
    "CorpusFile",
    "PythonCorpus",
    "PYTHON_SOURCES",
    "build_python_corpus",
    "encode_texts",
    "sources_named",
]

#: Files larger than this are left out by default (generated tables and test data, not prose or code people wrote).
MAX_FILE_BYTES = 1 << 20
#: Directories never read: installed packages inside the standard library's tree, byte-code caches.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class CorpusSource:
    """One source of the corpus: the standard library (``module=None``) or an installed distribution.

    Attributes:
        name: ``"stdlib"`` or the distribution's name on PyPI (``"scikit-learn"``).
        licence: the licence the project states for its code (SPDX where there is one).
        module: the import package whose directory is read (``"sklearn"``); ``None`` for the standard library.
    """

    name: str
    licence: str
    module: str | None = None


#: The documented list: the standard library and the packages of a typical deep-learning image, with the licence of
#: each project's own code.
PYTHON_SOURCES: tuple[CorpusSource, ...] = (
    CorpusSource("stdlib", "PSF-2.0"),
    CorpusSource("torch", "BSD-3-Clause", "torch"),
    CorpusSource("transformers", "Apache-2.0", "transformers"),
    CorpusSource("jax", "Apache-2.0", "jax"),
    CorpusSource("numpy", "BSD-3-Clause", "numpy"),
    CorpusSource("scipy", "BSD-3-Clause", "scipy"),
    CorpusSource("scikit-learn", "BSD-3-Clause", "sklearn"),
    CorpusSource("pandas", "BSD-3-Clause", "pandas"),
    CorpusSource("matplotlib", "Matplotlib License (PSF-based)", "matplotlib"),
    CorpusSource("sympy", "BSD-3-Clause", "sympy"),
    CorpusSource("networkx", "BSD-3-Clause", "networkx"),
    CorpusSource("accelerate", "Apache-2.0", "accelerate"),
    CorpusSource("peft", "Apache-2.0", "peft"),
    CorpusSource("huggingface_hub", "Apache-2.0", "huggingface_hub"),
    CorpusSource("triton", "MIT", "triton"),
    CorpusSource("jinja2", "BSD-3-Clause", "jinja2"),
)


def sources_named(names: Iterable[str], flag: str = "--sources") -> tuple[CorpusSource, ...]:
    """The :data:`PYTHON_SOURCES` called ``names``, in the list's order; ``ValueError`` naming ``flag`` for an
    unknown or repeated name, or none at all."""
    names = list(names)
    known = {source.name: source for source in PYTHON_SOURCES}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{flag}: unknown source(s) {unknown}; the documented list is {list(known)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{flag} lists {repeated} more than once")
    if not names:
        raise ValueError(f"{flag} needs at least one source; the documented list is {list(known)}")
    return tuple(source for source in PYTHON_SOURCES if source.name in names)


@dataclass(frozen=True)
class CorpusFile:
    """One file of the corpus: its source, its path below the source's root, its size, its content hash and its
    split (``"train"`` or ``"eval"``)."""

    source: str
    path: str
    bytes: int
    sha256: str
    split: str


@dataclass
class PythonCorpus:
    """The corpus :func:`build_python_corpus` built: per-source reports, the files, the texts of each split and a
    hash of it all."""

    sources: list[dict[str, Any]]
    files: list[CorpusFile]
    train_texts: list[str] = field(repr=False)
    eval_texts: list[str] = field(repr=False)
    sha256: str
    settings: dict[str, Any]

    @property
    def missing(self) -> list[str]:
        """The listed sources that are not installed here."""
        return [source["name"] for source in self.sources if not source["found"]]

    def bytes_of(self, split: str) -> int:
        return sum(f.bytes for f in self.files if f.split == split)

    def summary(self) -> dict[str, Any]:
        """What a results file records: the hash, the settings, the split sizes and every source's report."""
        return {
            "sha256": self.sha256,
            "settings": dict(self.settings),
            "files": {split: sum(f.split == split for f in self.files) for split in ("train", "eval")},
            "bytes": {split: self.bytes_of(split) for split in ("train", "eval")},
            "missing": self.missing,
            "sources": [dict(source) for source in self.sources],
        }

    def sample(self, split: str, max_bytes: float) -> list[str]:
        """Texts of ``split`` (``"train"`` or ``"eval"``) up to ``max_bytes`` in all: in a fixed hash order of their
        names, each file that still fits (e.g. what a tokenizer is trained on)."""
        files = [(f, text) for f, text in zip(self._split_files(split), self._texts(split), strict=True)]
        kept, total = [], 0
        for file, text in sorted(files, key=lambda pair: _rank(pair[0].source, pair[0].path)):
            if total + file.bytes <= max_bytes:
                kept.append(text)
                total += file.bytes
        return kept

    def _split_files(self, split: str) -> list[CorpusFile]:
        return [f for f in self.files if f.split == split]

    def _texts(self, split: str) -> list[str]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self.train_texts if split == "train" else self.eval_texts

    def manifest(self) -> dict[str, Any]:
        """:meth:`summary` and every file (source, path, bytes, sha256, split): enough to check another build."""
        return dict(self.summary(), file_list=[asdict(f) for f in self.files])


def _licence_metadata(distribution: str) -> str | None:
    """The licence an installed distribution's metadata declares (SPDX expression, licence field or classifiers)."""
    try:
        meta = importlib.metadata.metadata(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    expression = meta.get("License-Expression")
    if expression:
        return expression
    text = (meta.get("License") or "").strip()
    if text:
        first = text.splitlines()[0].strip()
        return first if len(first) <= 100 else first[:97] + "..."
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or () if c.startswith("License ::")]
    return "; ".join(classifiers) or None


def _roots(source: CorpusSource) -> tuple[list[Path], str | None]:
    """The directories (or single module files) to read for ``source`` and its version; ``([], None)`` when it is
    not installed. Found by ``importlib.util.find_spec``, which does not import the package."""
    if source.module is None:
        return [Path(sysconfig.get_paths()["stdlib"])], platform.python_version()
    try:
        spec = importlib.util.find_spec(source.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return [], None
    roots = [Path(p) for p in spec.submodule_search_locations or ()]
    if not roots and spec.origin and spec.origin.endswith(".py"):
        roots = [Path(spec.origin)]
    try:
        version = importlib.metadata.version(source.name)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return roots, version


def _python_files(root: Path) -> list[tuple[str, Path]]:
    """``(path relative to the root's parent, path)`` of every ``.py`` file below ``root``, sorted, skipping
    :data:`EXCLUDED_DIRS` (a module file ``root`` is its own single file)."""
    if root.is_file():
        return [(root.name, root)]
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in EXCLUDED_DIRS)
        for name in names:
            if name.endswith(".py"):
                path = Path(directory) / name
                found.append((path.relative_to(root.parent).as_posix(), path))
    return sorted(found)


def _rank(*parts: str) -> str:
    """A fixed pseudo-random order of names (sha256 of the parts), for sampling and holding out."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _sample(candidates: list[tuple[CorpusSource, str, Path, int]], max_bytes: int) -> set[tuple[str, str]]:
    """``(source, path)`` of the files kept under a byte cap: in the :func:`_rank` order of their names, each file
    that still fits."""
    kept, total = set(), 0
    for source, relative, _, size in sorted(candidates, key=lambda c: _rank(c[0].name, c[1])):
        if total + size <= max_bytes:
            kept.add((source.name, relative))
            total += size
    return kept


def _held_out_units(sizes: dict[tuple[str, str], int], fraction: float) -> set[tuple[str, str]]:
    """The ``(source, directory)`` units held out: in :func:`_rank` order, each unit that still fits within
    ``fraction`` of all bytes."""
    target = fraction * sum(sizes.values())
    held, total = set(), 0
    for unit in sorted(sizes, key=lambda u: _rank(*u)):
        if total + sizes[unit] <= target:
            held.add(unit)
            total += sizes[unit]
    return held


def build_python_corpus(
    sources: Sequence[CorpusSource] = PYTHON_SOURCES,
    eval_fraction: float = 0.02,
    max_bytes: int | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    progress: bool = True,
) -> PythonCorpus:
    """Read the ``.py`` files of the installed ``sources`` into a training and a held-out split.

    Args:
        sources: what to read, in this order (:data:`PYTHON_SOURCES`; :func:`sources_named` picks some). A source
            that is not installed is reported (``found: False``) and skipped.
        eval_fraction: the share of bytes held out, as whole directories (a directory goes to the held-out split
            when it still fits, in a fixed hash order of the names, so the share is at most this).
        max_bytes: read only files up to this many bytes in all, chosen in a fixed hash order of their names
            (spread over every source), e.g. for a small dry run; ``None``: everything.
        max_file_bytes: leave out larger files.
        progress: a progress bar over the files read.

    Raises:
        ValueError: naming the argument for an ``eval_fraction`` outside (0, 0.5], a ``max_bytes`` or
            ``max_file_bytes`` below 1, or no whole directory fitting in the held-out share.
    """
    if not 0 < eval_fraction <= 0.5:
        raise ValueError(f"eval_fraction must be in (0, 0.5], got {eval_fraction!r}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1 (or None for everything), got {max_bytes!r}")
    if max_file_bytes < 1:
        raise ValueError(f"max_file_bytes must be >= 1, got {max_file_bytes!r}")
    from tqdm.auto import tqdm

    reports: list[dict[str, Any]] = []
    candidates: list[tuple[CorpusSource, str, Path, int]] = []
    for source in sources:
        roots, version = _roots(source)
        report = {
            "name": source.name,
            "found": bool(roots),
            "version": version,
            "licence": source.licence,
            "licence_metadata": _licence_metadata(source.name) if source.module else "PSF-2.0",
            "location": [str(root) for root in roots],
            "files": 0,
            "bytes": 0,
            "skipped": {"too_large": 0, "not_utf8": 0, "empty": 0, "duplicate": 0},
        }
        reports.append(report)
        if not roots:
            logger.warning("corpus: %s is not installed here; it is left out", source.name)
            continue
        for root in roots:
            for relative, path in _python_files(root):
                size = path.stat().st_size
                if size > max_file_bytes:
                    report["skipped"]["too_large"] += 1
                    continue
                candidates.append((source, relative, path, size))
    if max_bytes is not None:
        chosen = _sample(candidates, max_bytes)
        candidates = [c for c in candidates if (c[0].name, c[1]) in chosen]

    by_name = {report["name"]: report for report in reports}
    seen: set[str] = set()
    read: list[tuple[str, str, str, str]] = []  # source, path, sha256, text
    for source, relative, path, _ in tqdm(candidates, desc="corpus: reading files", unit="file", disable=not progress):
        report = by_name[source.name]
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            report["skipped"]["not_utf8"] += 1
            continue
        if not text.strip():
            report["skipped"]["empty"] += 1
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest in seen:
            report["skipped"]["duplicate"] += 1
            continue
        seen.add(digest)
        read.append((source.name, relative, digest, text))
        report["files"] += 1
        report["bytes"] += len(raw)

    unit_sizes: dict[tuple[str, str], int] = {}
    for name, relative, _, text in read:
        unit = (name, relative.rpartition("/")[0])
        unit_sizes[unit] = unit_sizes.get(unit, 0) + len(text.encode("utf-8"))
    held = _held_out_units(unit_sizes, eval_fraction)
    if read and not held:
        raise ValueError(
            f"eval_fraction {eval_fraction} holds out no whole directory of this corpus (the smallest is "
            f"{min(unit_sizes.values()):,} of {sum(unit_sizes.values()):,} bytes); raise it"
        )

    files, train_texts, eval_texts = [], [], []
    corpus_hash = hashlib.sha256()
    for name, relative, digest, text in read:
        split = "eval" if (name, relative.rpartition("/")[0]) in held else "train"
        data = text.encode("utf-8")
        files.append(CorpusFile(name, relative, len(data), digest, split))
        (eval_texts if split == "eval" else train_texts).append(text)
        corpus_hash.update(f"{name}\0{relative}\0{split}\0".encode())
        corpus_hash.update(data)
        corpus_hash.update(b"\0")
    settings = {
        "sources": [source.name for source in sources],
        "eval_fraction": eval_fraction,
        "max_bytes": max_bytes,
        "max_file_bytes": max_file_bytes,
    }
    corpus = PythonCorpus(reports, files, train_texts, eval_texts, corpus_hash.hexdigest(), settings)
    logger.info(
        "corpus: %d files, %.1f MB for training and %.1f MB held out, from %d of %d sources (sha256 %s)",
        len(files),
        corpus.bytes_of("train") / 1e6,
        corpus.bytes_of("eval") / 1e6,
        sum(r["found"] for r in reports),
        len(reports),
        corpus.sha256[:12],
    )
    return corpus


def encode_texts(tokenizer: Any, texts: Sequence[str], batch: int = 256, desc: str = "tokenizing") -> np.ndarray:
    """All ``texts`` encoded by a ``tokenizers.Tokenizer`` (whose post-processor ends each with its end-of-sequence
    token), concatenated in order: ``uint16`` when the vocabulary fits, else ``int32``."""
    from tqdm.auto import tqdm

    dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: faster (tokenizers 0.21+)
    parts = []
    for start in tqdm(range(0, len(texts), batch), desc=desc, unit="batch", disable=len(texts) <= batch):
        for encoding in encode(list(texts[start : start + batch])):
            parts.append(np.asarray(encoding.ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
