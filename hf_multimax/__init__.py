"""hf-multimax: MultiMax attention (Zhou, Fritz & Keuper, ICML 2024) for Hugging Face Transformers.

``import hf_multimax`` registers ``attn_implementation="multimax"`` with Transformers.
"""

from importlib.metadata import PackageNotFoundError, version

from .config import FLAG_DEFAULTS, MultiMaxSettings
from .functional import multimax, seglu
from .integration import MULTIMAX, MultiMaxWarning, attach_multimax, multimax_modules, register
from .comparators import COMPARATORS  # registers "sparsemax", "entmax15", "entmax_alpha", "evsoftmax"
from .modules import SegLU
from .training import clip_grad_norm_, multimax_parameter_groups

try:
    __version__ = version("hf-multimax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

register()

__all__ = [
    "FLAG_DEFAULTS",
    "MULTIMAX",
    "MultiMaxSettings",
    "MultiMaxWarning",
    "SegLU",
    "attach_multimax",
    "clip_grad_norm_",
    "multimax",
    "multimax_modules",
    "multimax_parameter_groups",
    "register",
    "seglu",
]
