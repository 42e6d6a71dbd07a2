"""``hf-multimax compare``: the same tiny model trained with each attention implementation on several seeds, side by
side (the runs: :mod:`.runner`; statistics over seeds: :mod:`.statistics`; the tables, figures and result files:
:mod:`.report`). Training runs need the ``train`` extra, the statistics and figures ``analysis``: :func:`compare` checks
both before anything runs; the reports alone (used on a GPU machine without ``train``) need only ``analysis``."""

from .report import format_attention_table, format_table, plot_loss_curves, plot_metrics, write_report
from .runner import COMPARE_DEFAULTS, build_results, compare, resolve_seeds

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
