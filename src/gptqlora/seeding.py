"""Seeded randomness, decided in one place: a seeded order of n items, and the global generators a run seeds.

Every seeded order a run draws (the training data per epoch, the held-out split, few-shot exemplars, the verifier's
data) is ``permutation(n, seed)``: a fresh CPU generator per draw, so an order depends on its seed alone, never on
what was drawn before it, and is the same on every rank and every machine.
"""

from __future__ import annotations

import random

import torch


def permutation(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` drawn from ``torch.Generator().manual_seed(seed)`` (``torch.randperm``)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def seed_everything(seed: int) -> None:
    """Seed every global generator a run draws from: torch's (CPU and every CUDA device), Python's, NumPy's.

    Call it before ``inject_lora_layers`` so the LoRA init is seeded too; training calls it on a fresh start (LoRA
    dropout draws from torch's generator). Seeded orders have generators of their own (``permutation``).
    """
    random.seed(seed)
    torch.manual_seed(seed)  # seeds the CUDA devices as well
    torch.cuda.manual_seed_all(seed)  # explicit, and deferred until CUDA initialises
    try:
        import numpy as np
    except ImportError:  # NumPy is optional: nothing of ours draws from it
        return
    np.random.seed(seed % 2**32)  # NumPy takes 32-bit seeds


def request_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed for one request of an engine that seeds each request apart (vLLM's per-request ``seed``): a
    hash of ``seed`` and ``parts`` (e.g. a question's place in its batch and a sample's number), so every request
    draws apart from the others and from what ran before it."""
    import hashlib

    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
