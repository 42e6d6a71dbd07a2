"""Share MultiMax checkpoints on the Hugging Face Hub: :func:`push_to_hub` (the folder, its model card and σ plot, one
commit), the card itself (:mod:`.cards`) and, with ``remote_code=True``, the file that loads the model where
hf-multimax is not installed (:mod:`.remote_code`, rendered from :mod:`.remote_modeling`). ``hf-multimax push`` is its
command line; ``docs/hub.md`` tells the whole story."""

from .cards import build_eval_results, write_model_card
from .push import HubPushError, PushResult, default_local_dir, push_to_hub

__all__ = ["HubPushError", "PushResult", "build_eval_results", "default_local_dir", "push_to_hub", "write_model_card"]
