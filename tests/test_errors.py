"""The error classes: what the CLI treats as the user's, and how they travel between ranks."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

from gptqlora.errors import NonFiniteLossError, UsageError


def test_a_non_finite_loss_crosses_ranks_with_its_message_whole():
    # distributed.from_main pickles what rank 0 raised and raises it on every rank: the same line everywhere.
    for e in (NonFiniteLossError(7, math.inf, "gradient norm", Path("run/train_state/step-00000006")),
              NonFiniteLossError(3, fix="rerun with a lower --lr")):
        again = pickle.loads(pickle.dumps(e))
        assert type(again) is NonFiniteLossError and str(again) == str(e)
        assert (again.step, again.checkpoint) == (e.step, e.checkpoint)
    assert "rerun with a lower --lr" in str(NonFiniteLossError(3, fix="rerun with a lower --lr"))


def test_a_usage_error_is_a_value_error_for_library_callers():
    assert issubclass(UsageError, ValueError) and not issubclass(NonFiniteLossError, UsageError)
