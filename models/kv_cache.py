"""A preallocated key/value cache for one layer, written at cache slots."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of one layer: two (B, K, max_len, hd) buffers.

    `update` writes new entries at the given slots and returns views of slots [0, last written],
    so attention only reads what has been filled. The buffers are the object's for life (written
    in place, never replaced): the CPU decoder binds to a cache by identity.
    """

    def __init__(
        self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    def update(self, cache_pos: Tensor, k: Tensor, v: Tensor, whole: bool = False) -> tuple[Tensor, Tensor]:
        """k, v: (B, K, T, hd) for slots cache_pos (T,), stored in the cache's dtype. Returns
        (B, K, S, hd) views with S = last slot + 1, in the cache's dtype; with `whole`, all
        max_len slots, without reading the position back from the device (CUDA graphs)."""
        self.k.index_copy_(2, cache_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, cache_pos, v.to(self.v.dtype))
        if whole:
            return self.k, self.v
        last = int(cache_pos[-1]) + 1
        return self.k[:, :, :last], self.v[:, :, :last]

    def truncate(self, length: int) -> None:
        """Forget slots at and after `length` (used when a request is rolled back)."""
        self.k[:, :, length:] = 0
        self.v[:, :, length:] = 0
