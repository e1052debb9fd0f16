"""What the hardware module reads off the machine."""

from __future__ import annotations

import os

import torch

from gptqlora.hardware import free_memory


def test_free_memory_is_the_hosts_available_memory_on_a_cpu():
    free = free_memory(torch.device("cpu"))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert free is not None and 0 < free <= total
    assert free_memory(torch.device("meta")) is None  # nothing to read there
