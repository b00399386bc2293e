"""matplotlib, when installed, for molm's PNG outputs (loss curves, expert-usage heat maps, benchmark plots)."""

from __future__ import annotations

import warnings


def pyplot(what: str):
    """matplotlib.pyplot on the file-only Agg backend, or None (with a warning naming `what`) when matplotlib is
    not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(f"matplotlib is not installed (pip install 'molm[train]'): no {what} written", stacklevel=3)
        return None
    return plt
