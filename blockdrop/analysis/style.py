"""The look every analysis figure shares: one colour per evaluated variant, text sizes readable at the saved
resolution, and a save that never leaves half a PNG. ``figures`` and ``tradeoff`` both draw with it."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything could pick an interactive backend

from matplotlib.figure import Figure

from blockdrop.files import atomic_write_bytes

__all__ = ["STYLE", "VARIANTS", "VARIANT_COLORS", "VARIANT_LABELS", "save_figure", "styled"]

# full: the pretrained backbone (the paper's baseline); full_finetuned: the same backbone trained further, every
# block on, on exactly the budget finetune gives BlockDrop's backbone (the finetune-full stage).
VARIANTS = ("full", "full_finetuned", "blockdrop", "firstk", "randomk")
VARIANT_LABELS = {"full": "Full ResNet, pretrained", "full_finetuned": "Full ResNet, trained as BlockDrop's backbone",
                  "blockdrop": "BlockDrop", "firstk": "FirstK", "randomk": "RandomK"}
VARIANT_COLORS = {"full": "#4d4d4d", "full_finetuned": "#9467bd", "blockdrop": "#d62728", "firstk": "#1f77b4",
                  "randomk": "#2ca02c"}
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 13,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.facecolor": "white",
}


def styled(draw: Callable) -> Callable:
    """Draw under ``STYLE`` without touching matplotlib's global settings."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


def save_figure(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (format from its suffix) atomically; the path."""
    path = Path(path)
    buf = io.BytesIO()  # rendered in memory, then written atomically: a kill never leaves half a PNG
    fig.savefig(buf, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    atomic_write_bytes(path, buf.getvalue())
    return path
