"""Packing integer codes into int32 words, in the GPTQ v1 layout.

Codes are packed along the first dimension as one little-endian bit stream: code i occupies bits
[i*b, (i+1)*b) of the stream, and word w holds stream bits [32w, 32w+32), least significant first. For 2, 4 and 8
bits that is ``word[i] = sum_j q[(32/b)*i + j] << (b*j)``; for 3 bits, 32 codes fill 3 words and codes 10 and 21
straddle a word boundary, which is the layout AutoGPTQ/GPTQModel/vLLM read.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check(rows: int, bits: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"cannot pack {bits}-bit codes: bits must be 2, 3, 4 or 8")
    if rows * bits % 32:
        raise ValueError(f"{rows} rows of {bits}-bit codes do not fill whole int32 words: the packed dimension must be "
                         f"a multiple of {32 // math.gcd(32, bits)}")


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack codes [R, C] (integers in [0, 2^bits)) into int32 [R*bits/32, C].

    Works in int32 throughout (a code shifted into bit 31 gives the negative int32 with those bits), one code slot
    of every word at a time: the temporaries are word-sized [R*bits/32, C], never an int64 copy of all codes, which
    for 7B's down_proj would be 360 MB twice over.
    """
    rows, cols = codes.shape
    _check(rows, bits)
    if 32 % bits == 0:
        per_word = 32 // bits
        slots = codes.reshape(rows // per_word, per_word, cols)  # [W, per_word, C]: code per_word*w + j
        words = slots[:, 0].to(torch.int32, memory_format=torch.contiguous_format)  # [W, C]
        for j in range(1, per_word):
            words |= slots[:, j].to(torch.int32) << (bits * j)
        return words
    # General bit stream: scatter each bit plane to its word and shift (adding disjoint bits is OR).
    q = codes.to(torch.int32)
    words = torch.zeros(rows * bits // 32, cols, dtype=torch.int32, device=q.device)
    for j in range(bits):
        pos = torch.arange(rows, device=q.device) * bits + j  # stream position of bit j of each code
        plane = ((q >> j) & 1) << (pos % 32).to(torch.int32)[:, None]  # [R, C]
        words.index_add_(0, pos // 32, plane)
    return words


def unpack_rows(packed: Tensor, bits: int, rows: int) -> Tensor:
    """Inverse of :func:`pack_rows`: int32 [rows*bits/32, C] -> int32 codes [rows, C]."""
    _check(rows, bits)
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
        # Arithmetic shifts of negative words fill with ones, which the mask removes.
        return ((packed.unsqueeze(1) >> shifts[None, :, None]) & mask).reshape(rows, packed.shape[1])
    codes = torch.zeros(rows, packed.shape[1], dtype=torch.int32, device=packed.device)
    for j in range(bits):
        pos = torch.arange(rows, device=packed.device) * bits + j
        bit = (packed[pos // 32] >> (pos % 32).to(torch.int32)[:, None]) & 1
        codes |= bit << j
    return codes


def pack_qweight(codes: Tensor, bits: int) -> Tensor:
    """Weight codes [N, K] (out, in) -> qweight int32 [K*bits/32, N], packed along K."""
    return pack_rows(codes.T, bits)


def unpack_qweight(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """qweight int32 [K*bits/32, N] -> codes int32 [K, N] (note: in-major, ready for ``x @ W_kn``)."""
    return unpack_rows(qweight, bits, in_features)


def pack_qzeros(zeros: Tensor, bits: int) -> Tensor:
    """Zero points [G, N] (integer-valued, in [1, 2^bits]) -> qzeros int32 [G, N*bits/32], storing ``zero - 1`` (v1)."""
    stored = zeros.to(torch.int32) - 1
    if (stored < 0).any() or (stored > (1 << bits) - 1).any():
        raise ValueError("zero points must lie in [1, 2^bits] to be stored in the GPTQ v1 format")
    return pack_rows(stored.T, bits).T.contiguous()


def unpack_qzeros(qzeros: Tensor, bits: int, out_features: int) -> Tensor:
    """qzeros int32 [G, N*bits/32] -> zero points int32 [G, N] (the stored value + 1)."""
    return unpack_rows(qzeros.T.contiguous(), bits, out_features).T + 1
