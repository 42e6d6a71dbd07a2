"""``hf-multimax compare``: the same tiny model trained with each attention implementation, side by side (the
runs: :mod:`.runner`; the table, figure and result files: :mod:`.report`)."""

from .report import format_table, plot_loss_curves
from .runner import COMPARE_DEFAULTS, compare

__all__ = ["COMPARE_DEFAULTS", "compare", "format_table", "plot_loss_curves"]
