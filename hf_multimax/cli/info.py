"""``hf-multimax info``: versions, the registered attention implementations and the MultiMax flags."""

from __future__ import annotations

import argparse
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .. import registry
    from .._version import __version__
    from ..config import FLAG_DEFAULTS

    lines = [
        f"hf-multimax   {__version__}",
        f"transformers  {transformers.__version__}",
        f"torch         {torch.__version__} (cuda available: {torch.cuda.is_available()})",
        f"python        {platform.python_version()} on {platform.machine()}",
        "",
        "attention implementations: eager, " + ", ".join(sorted(AttentionInterface().valid_keys())),
        "  from hf-multimax:        " + ", ".join(registry.IMPLEMENTATIONS),
        "  comparators on request:  "
        + ", ".join(registry.COMPARATOR_IMPLEMENTATIONS)
        + " (hf_multimax.register_comparators(); the CLI and scripts register the ones named)",
        "mask functions:            " + ", ".join(sorted(AttentionMaskInterface().valid_keys())),
        "",
        "MultiMax flags (config / from_pretrained keyword arguments):",
    ]
    lines += [f"  {name:<20} default {value!r}" for name, value in FLAG_DEFAULTS.items()]
    print("\n".join(lines))
    return 0
