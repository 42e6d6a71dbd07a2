"""Share MultiMax checkpoints on the Hugging Face Hub: :func:`push_to_hub` (the folder, its model card and σ plot, one
commit) and the card itself (:mod:`.cards`). ``hf-multimax push`` is its command line."""

from .cards import build_eval_results, write_model_card
from .push import HubPushError, PushResult, default_local_dir, push_to_hub

__all__ = ["HubPushError", "PushResult", "build_eval_results", "default_local_dir", "push_to_hub", "write_model_card"]
