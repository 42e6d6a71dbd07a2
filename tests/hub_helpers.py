"""What the hub tests share with the process that loads pushed folders where hf-multimax cannot be imported
(``integration/remote_code_worker.py``): a tiny tokenizer, and running any model on the inputs it takes. Nothing here
imports hf_multimax."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
#: A ``sitecustomize`` that makes ``import hf_multimax`` fail, as on a machine where it is not installed (the package is
#: installed here, editable): put its folder first on ``PYTHONPATH``.
IMPORT_BLOCKER = '''
import sys


class NoHfMultimax:
    """Every import of hf_multimax fails, as where it is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "hf_multimax" or name.startswith("hf_multimax."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, NoHfMultimax())
'''


#: ``from_pretrained`` arguments per Auto class: question answering needs two labels (start and end), where a
#: classification checkpoint may have more (Transformers' QA heads read ``num_labels``).
AUTO_CLASS_KWARGS = {"AutoModelForQuestionAnswering": {"num_labels": 2}}


def load(auto_class: str, folder, **kwargs) -> torch.nn.Module:
    """``AutoX.from_pretrained(folder)``, with the weights the checkpoint lacks (a new head) set to the same values in
    every process: their random initialisation is not comparable across classes (Transformers skips some
    initialisations for remote code)."""
    import transformers

    kwargs = {**AUTO_CLASS_KWARGS.get(auto_class, {}), **kwargs}
    model, info = getattr(transformers, auto_class).from_pretrained(folder, output_loading_info=True, **kwargs)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for index, key in enumerate(sorted(info["missing_keys"])):
            if key in parameters:
                generator = torch.Generator().manual_seed(index)
                parameters[key].copy_(0.1 * torch.randn(parameters[key].shape, generator=generator))
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS` (ids below every family's vocabulary)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def call(model: torch.nn.Module, inputs: dict) -> object:
    """``model(**inputs)`` with only the inputs its ``forward`` takes (an encoder-only head takes no decoder ids, and
    encoder-decoder classification heads want none)."""
    accepted = dict(inspect.signature(model.forward).parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):  # a wrapper (PEFT) takes them all
        accepted = dict(inputs)
    if re.search(r"For(SequenceClassification|QuestionAnswering)$", type(model).__name__):
        accepted.pop("decoder_input_ids", None)  # encoder-decoder heads pool the decoder run on the shifted inputs
    with torch.no_grad():
        return model(**{name: value for name, value in inputs.items() if name in accepted})


def output_tensors(output) -> dict[str, torch.Tensor]:
    """The tensors of a model output (logits, hidden states...), by field name; caches are left out."""
    return {name: value for name, value in output.items() if isinstance(value, torch.Tensor)}


def write_import_blocker(folder: Path) -> Path:
    """Write :data:`IMPORT_BLOCKER` as ``folder/sitecustomize.py``; return ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(IMPORT_BLOCKER)
    return folder


def main_module_importable(name: str) -> bool:
    """Whether ``import name`` works in this process."""
    try:
        __import__(name)
    except ImportError:
        return False
    return name in sys.modules
