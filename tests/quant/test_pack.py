import pytest
import torch

from gptqlora.quant.pack import pack_qweight, pack_qzeros, pack_rows, unpack_qweight, unpack_qzeros, unpack_rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(64, 32), (576, 192), (96, 64)])
def test_pack_unpack_is_exact(bits, shape):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=g)  # [N, K]
    n, k = shape
    qweight = pack_qweight(codes, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (k * bits // 32, n)
    assert torch.equal(unpack_qweight(qweight, bits, k), codes.T.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("groups", [1, 9])
def test_qzeros_store_zero_minus_one(bits, groups):
    zeros = torch.randint(1, 2**bits + 1, (groups, 192))
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.shape == (groups, 192 * bits // 32)
    assert torch.equal(unpack_qzeros(qzeros, bits, 192), zeros.to(torch.int32))


def test_layout_matches_gptq_v1_reference_formula():
    # qweight[i, n] = sum_j q[8i + j, n] << 4j (least significant bits first), as INTEROP.md states for 4 bits.
    codes_kn = torch.randint(0, 16, (16, 3))
    packed = pack_rows(codes_kn, 4)
    for i in range(2):
        expected = sum(int(codes_kn[8 * i + j, 0]) << (4 * j) for j in range(8))
        assert packed[i, 0].item() & 0xFFFFFFFF == expected


def test_three_bit_codes_straddle_words():
    # Code 10 occupies stream bits 30..32: two low bits in word 0, the high bit in word 1.
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10, 0] = 0b111
    packed = pack_rows(codes, 3)
    assert (packed[0, 0].item() & 0xFFFFFFFF) == 0b11 << 30
    assert packed[1, 0].item() == 1
    assert torch.equal(unpack_rows(packed, 3, 32), codes.to(torch.int32))


def test_symmetric_4bit_zero_words():
    assert (pack_qzeros(torch.full((2, 8), 8), 4) & 0xFFFFFFFF).eq(0x77777777).all()


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(torch.zeros(20, 4, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="bits must be"):
        pack_rows(torch.zeros(32, 4, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="zero points"):
        pack_qzeros(torch.zeros(1, 8), 4)  # zero = 0 cannot be stored in v1
