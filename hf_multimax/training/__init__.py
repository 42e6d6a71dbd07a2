"""Training habits from upstream MultiMax, for any loop: parameter groups without weight decay on MultiMax
(:mod:`.optim`), clipping that treats output-layer MultiMax apart (:mod:`.clipping`), and the helpers of data-parallel
and sharded runs (:mod:`.distributed`). ``Trainer`` users: :mod:`hf_multimax.integrations.trainer`."""

from __future__ import annotations

import warnings

from .clipping import OUTPUT_CLIP_MODES, clip_grad_norm_, set_default_output_clip
from .optim import multimax_parameter_groups, multimax_parameter_names, output_multimax_parameter_names

__all__ = [
    "OUTPUT_CLIP_MODES",
    "clip_grad_norm_",
    "multimax_parameter_groups",
    "multimax_parameter_names",
    "output_multimax_parameter_names",
    "set_trainer_output_clip",
]


def set_trainer_output_clip(mode: str) -> None:
    """Deprecated: pass ``multimax_output_clip=mode`` to :class:`hf_multimax.MultiMaxTrainer` (or to
    :func:`hf_multimax.patch_trainer`). Sets the clipping mode of MultiMax trainers that were given none."""
    warnings.warn(
        "hf_multimax.training.set_trainer_output_clip is deprecated: pass multimax_output_clip= to "
        "hf_multimax.MultiMaxTrainer or hf_multimax.patch_trainer",
        FutureWarning,
        stacklevel=2,
    )
    set_default_output_clip(mode)
