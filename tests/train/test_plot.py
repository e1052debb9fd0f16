"""The loss curve PNG: written from train and eval records, without touching pyplot's global state."""

from __future__ import annotations

import sys

from gptqlora.train.plot import plot_loss_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_writes_a_png_of_train_and_eval_losses(tmp_path):
    history = [{"step": 0, "eval_loss": 5.0}] + [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 11)]
    history.append({"step": 10, "eval_loss": 4.2})
    path = plot_loss_curve(history, tmp_path / "loss_curve.png")
    data = path.read_bytes()
    assert path == tmp_path / "loss_curve.png" and data[:8] == PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert (width, height) == (700, 400)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_empty_history_still_writes_a_png_without_importing_pyplot(tmp_path):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    assert plot_loss_curve([], tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules  # the Agg canvas alone: no global backend switch
