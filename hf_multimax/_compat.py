"""Old module names, kept importable: each one is the module it became, with a ``FutureWarning`` on first import.

One table (:data:`MOVED`) and one meta-path finder; nothing else in the package refers to the old names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

__all__ = ["MOVED", "install"]

#: old module -> new module.
MOVED = {
    "hf_multimax.integration": "hf_multimax.integrations.transformers",
    "hf_multimax.modules": "hf_multimax.modeling",
    "hf_multimax.output_loss": "hf_multimax.loss",
    "hf_multimax.distributed": "hf_multimax.training.distributed",
    "hf_multimax.tasks": "hf_multimax.finetune.tasks",
    "hf_multimax.sacrebleu_metric": "hf_multimax.finetune.sacrebleu_metric",
    "hf_multimax.cards": "hf_multimax.hub.cards",
    "hf_multimax.plots": "hf_multimax.analysis.plots",
    "hf_multimax.analysis_plots": "hf_multimax.analysis.plots",
    "hf_multimax.kernels.function": "hf_multimax.kernels.dispatch",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # importlib set it to the alias's; the module keeps its own identity
        warnings.warn(
            f"{self.alias} moved to {self.target}; import it from there (the old name will be removed)",
            FutureWarning,
            stacklevel=2,
        )


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in MOVED:
            return None
        loader = _AliasLoader(MOVED[fullname])
        loader.alias = fullname
        return importlib.machinery.ModuleSpec(fullname, loader)


_FINDER = _AliasFinder()


def install() -> None:
    """Make the old names importable (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
