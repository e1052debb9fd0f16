"""The loss curve of a run as a PNG: train loss per step, held-out eval loss as points."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptqlora.files import write_atomic


def plot_loss_curve(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Draw train loss per step and the eval losses, and write them to ``path`` as a PNG.

    The figure is drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), not through
    pyplot: no window is opened and the process-wide backend of the caller is left alone.

    Args:
        history: metrics records; those with ``loss`` are train steps, those with ``eval_loss`` evaluations.
        path: the PNG to write (its directory must exist); replaced atomically.
    Returns:
        ``path`` as a Path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), lw=1, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", ms=4, label="held-out eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("NLL per answer token (nats)")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return write_atomic(path, png.getvalue())
