"""``hf-multimax compare``: the same tiny model trained with each attention implementation on several seeds, side by
side (the runs: :mod:`.runner`; statistics over seeds: :mod:`.statistics`; the tables, figures and result files:
:mod:`.report`). Needs the ``train`` and ``analysis`` extras; importing it without them raises
:class:`~hf_multimax.extras.MissingExtraError` naming what to install."""

from ..extras import require

require(("train", "analysis"), "hf_multimax.compare")

# The imports come after the extras check, so that a missing extra is one clear error.
from .report import format_attention_table, format_table, plot_loss_curves, plot_metrics, write_report  # noqa: E402
from .runner import COMPARE_DEFAULTS, build_results, compare, resolve_seeds  # noqa: E402

__all__ = [
    "COMPARE_DEFAULTS",
    "build_results",
    "compare",
    "format_attention_table",
    "format_table",
    "plot_loss_curves",
    "plot_metrics",
    "resolve_seeds",
    "write_report",
]
