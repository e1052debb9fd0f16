"""The loss curve PNG: written from train and eval records, without touching pyplot's global state."""

from __future__ import annotations

import sys

import pytest

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


@pytest.mark.parametrize("history", [[], [{"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 1, "eval_loss": 2.5}]],
                         ids=["empty", "one-step"])
def test_writes_a_png_without_importing_pyplot(tmp_path, monkeypatch, history):
    # pyplot made unimportable (None in sys.modules; no attribute for `from matplotlib import pyplot`), whether or
    # not an earlier test imported it: the Agg canvas alone, no global backend switch.
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.delattr("matplotlib.pyplot", raising=False)
    assert plot_loss_curve(history, tmp_path / "curve.png").read_bytes()[:8] == PNG_MAGIC
