"""The optional parts of hf-multimax and what each needs: one table, one check.

``pip install hf-multimax`` installs the core (torch and Transformers): ``import hf_multimax``,
``attn_implementation="multimax"``, the fused kernels, output-layer MultiMax, ``MultiMaxTrainer`` and the PEFT helpers.
Everything else is an extra, named after what it is for (``pip install 'hf-multimax[train]'``):

=============== ================================================================ =====================================
extra           for                                                              packages
=============== ================================================================ =====================================
``train``       the fine-tuning scripts, ``hf-multimax compare``, Trainer runs   accelerate, datasets, evaluate, peft,
                                                                                 sacrebleu, scikit-learn
``analysis``    ``hf-multimax analyze``, the figures, ``compare``'s statistics  matplotlib, scipy
``hub``         ``hf-multimax push`` and :func:`hf_multimax.hub.push_to_hub`     jinja2, matplotlib
``comparators`` SparseMax and the EntMax variants                                entmax
``gpu``         the Triton kernel (PyTorch's CUDA wheels ship it)                triton
``all``         every extra but ``gpu``
=============== ================================================================ =====================================

:func:`require` is how a command or function that needs an extra says so: one :class:`MissingExtraError` (an
``ImportError``) whose message names the missing packages and the ``pip install`` line, raised before any work starts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

__all__ = ["EXTRAS", "MissingExtraError", "missing", "require"]

#: extra -> the modules it provides (import names, not distribution names: ``sklearn`` is scikit-learn).
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("accelerate", "datasets", "evaluate", "peft", "sacrebleu", "sklearn"),
    "analysis": ("matplotlib", "scipy"),
    "hub": ("jinja2", "matplotlib"),
    "comparators": ("entmax",),
    "gpu": ("triton",),
}
#: import name -> distribution name, where they differ.
DISTRIBUTIONS = {"sklearn": "scikit-learn"}


class MissingExtraError(ImportError):
    """An optional part of hf-multimax was used without its packages installed. ``extras`` names what to install."""

    def __init__(self, message: str, extras: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.extras = extras


def missing(modules: Iterable[str]) -> list[str]:
    """Those of ``modules`` that cannot be imported here (checked without importing them)."""
    absent = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that fails to import, or a module without a spec
            found = False
        if not found:
            absent.append(module)
    return absent


def require(extras: str | Iterable[str], feature: str, modules: Iterable[str] | None = None) -> None:
    """Raise :class:`MissingExtraError` when a package of ``extras`` (or just ``modules`` of them) is missing.

    Args:
        extras: the extra (or extras) ``feature`` needs, e.g. ``"train"`` or ``("train", "analysis")``.
        feature: what the user asked for, as they would name it (``"hf-multimax compare"``).
        modules: check only these modules (e.g. ``["entmax"]``); default: every module of ``extras``.
    """
    extras = (extras,) if isinstance(extras, str) else tuple(extras)
    unknown = [extra for extra in extras if extra not in EXTRAS]
    if unknown:
        raise ValueError(f"unknown extra {unknown[0]!r}; known: {sorted(EXTRAS)}")
    wanted = list(modules) if modules is not None else [m for extra in extras for m in EXTRAS[extra]]
    absent = missing(dict.fromkeys(wanted))
    if absent:
        names = ", ".join(DISTRIBUTIONS.get(module, module) for module in absent)
        raise MissingExtraError(
            f"{feature} needs {names}, which {'is' if len(absent) == 1 else 'are'} not installed: "
            f"pip install 'hf-multimax[{','.join(extras)}]'",
            extras,
        )
