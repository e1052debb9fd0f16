"""QuantizedLinear: a drop-in ``nn.Linear`` replacement holding only packed GPTQ v1 buffers.

Buffers (names and layouts are the checkpoint's): qweight int32 [K*b/32, N], qzeros int32 [G, N*b/32],
scales fp16 [G, N], g_idx int32 [K], bias [N] or absent. Forward unpacks the codes, dequantizes in the input's dtype
and multiplies; nothing dequantized is kept unless ``cache_dequantized`` is switched on (it costs one dense weight,
K*N elements in the input dtype, per layer: the memory saving is then gone, in exchange for speed).

Backward: the layer is frozen, so its weight needs no gradient, but the input does. A custom autograd function
saves nothing but the (already held) packed buffers and dequantizes again in backward, so training holds no dense
copy of the weight between forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gptqlora.quant.grid import QuantResult, num_groups
from gptqlora.quant.pack import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros


def dequantize_packed(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, in_features: int,
                      group_size: int, dtype: torch.dtype, sequential_groups: bool) -> Tensor:
    """The weight in [K, N] (in, out) layout and ``dtype``, from packed v1 buffers.

    ``sequential_groups`` (g_idx == k // group_size) lets the scales broadcast over whole groups instead of a gather.
    """
    q = unpack_qweight(qweight, bits, in_features).to(dtype)  # [K, N]
    n_out = q.shape[1]
    z = unpack_qzeros(qzeros, bits, n_out).to(dtype)  # [G, N]
    s = scales.to(dtype)  # [G, N]
    if sequential_groups and in_features % group_size == 0:
        n_groups = in_features // group_size
        w = (q.view(n_groups, group_size, n_out) - z[:, None, :]) * s[:, None, :]  # [G, g, N]
        return w.view(in_features, n_out)
    idx = g_idx.long()
    return (q - z[idx]) * s[idx]


class _DequantMatmul(torch.autograd.Function):
    """y = x @ W_kn (+ bias) where W is rebuilt from packed buffers in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "QuantizedLinear") -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        w = layer.weight_kn(x.dtype)  # [K, N]
        y = x @ w
        return y if layer.bias is None else y + layer.bias.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        w = ctx.layer.weight_kn(grad_out.dtype)  # [K, N]
        return grad_out @ w.T, None


class QuantizedLinear(nn.Module):
    """A frozen linear layer stored as GPTQ v1 packed codes.

    Args:
        in_features, out_features: as nn.Linear (K, N).
        bits, group_size: the grid the codes were made on (group_size -1 = K).
        bias: whether a bias buffer exists.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits={bits} is not supported: use 2, 3, 4 or 8")
        if in_features * bits % 32 or out_features * bits % 32:
            raise ValueError(f"a {bits}-bit QuantizedLinear needs in and out features that fill int32 words "
                             f"(got {in_features} x {out_features})")
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.group_size = in_features if group_size == -1 else group_size
        n_groups = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32, device=device) // self.group_size)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None
        self.cache_dequantized = False
        self._cache: Tensor | None = None

    @classmethod
    def from_result(cls, result: QuantResult, bits: int, group_size: int, bias: Tensor | None = None
                    ) -> "QuantizedLinear":
        """Pack a solver's result (codes [N, K], scales/zeros [G, N], g_idx [K]) into a new layer."""
        n, k = result.codes.shape
        layer = cls(k, n, bits, group_size, bias=bias is not None, device=result.codes.device)
        layer.qweight.copy_(pack_qweight(result.codes, bits))
        layer.qzeros.copy_(pack_qzeros(result.zeros, bits))
        layer.scales.copy_(result.scales.half())
        layer.g_idx.copy_(result.g_idx)
        if bias is not None:
            layer.bias = bias.detach().to(torch.float16).clone()
        return layer

    @property
    def sequential_groups(self) -> bool:
        """True when g_idx is k // group_size (no act-order), which allows a faster dequantization."""
        return bool(torch.equal(self.g_idx, torch.arange(self.in_features, device=self.g_idx.device,
                                                         dtype=torch.int32) // self.group_size))

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._sequential = None
        self._cache = None

    def weight_kn(self, dtype: torch.dtype) -> Tensor:
        """The dense weight in [K, N] layout (transposed nn.Linear layout), in ``dtype``."""
        if self._cache is not None and self._cache.dtype == dtype:
            return self._cache
        seq = getattr(self, "_sequential", None)
        if seq is None:
            seq = self._sequential = self.sequential_groups
        w = dequantize_packed(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.in_features,
                              self.group_size, dtype, seq)
        if self.cache_dequantized:
            self._cache = w
        return w

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight [N, K] in nn.Linear layout."""
        return self.weight_kn(dtype).T.contiguous()

    def set_cache(self, enabled: bool) -> None:
        """Keep the dequantized weight between calls: faster, but costs K*N elements of memory per layer."""
        self.cache_dequantized = enabled
        self._cache = None

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            if torch.is_grad_enabled() and x.requires_grad:
                return _DequantMatmul.apply(x, self)
            w = self.weight_kn(x.dtype)
            y = x @ w
            return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
