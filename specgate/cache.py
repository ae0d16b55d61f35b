"""One KV cache shared by draft and verify passes, grown in chunks as decoding goes (:meth:`reserve`).

Sequence ``b`` occupies slots ``pad[b] .. lengths[b] - 1`` of its row (left padding first). A pass
of T new tokens writes slots ``lengths[b] .. lengths[b] + T - 1`` and advances ``lengths``; rolling
back rejected draft tokens is :meth:`rewind`, a pointer move. Stale entries past ``lengths`` are
never read: every query only sees slots at or before its own.

The host keeps its own copy of ``lengths`` and ``pad`` (``host_lengths``, ``host_pad``), updated
with them, so that a pass knows where it writes without reading the device: a single-token draft
step then never waits on the device (see :mod:`specgate.dispatch`). Move the positions only
through :meth:`reset`, :meth:`advance` and :meth:`rewind`.
"""

from __future__ import annotations

import torch

GROWTH = 256  # slots a cache grows by at least: a long max_new_tokens allocates nothing up front


class StaticKVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        # One buffer per layer, so a training forward can backpropagate through the writes: each
        # buffer is written once per pass, before its layer reads it.
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # next write slot
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)  # left-padding slots
        self.host_lengths, self.host_pad = [0] * batch, [0] * batch  # the same, on the host
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def reset(self, pad: torch.Tensor | None = None) -> None:
        """Empty the cache; ``pad`` (B,) is the left padding of the prompt about to be written
        (read once on the host)."""
        self.lengths.zero_()
        self.pad.zero_()
        self.host_lengths = [0] * self.batch
        self.host_pad = [0] * self.batch
        if pad is not None:
            self.pad.copy_(pad)
            self.host_pad = pad.tolist()

    def reserve(self, n_slots: int, most: int) -> None:
        """Make room for ``n_slots`` slots per row, keeping what the cache holds. Grows every layer's
        buffers to twice their size (by GROWTH slots at least), but never past ``most``: the most
        slots the caller can need (prompt + max_new_tokens, capped at the model's context)."""
        if n_slots <= self.max_len:
            return
        if n_slots > most:
            raise ValueError(f"cache asked for {n_slots} slots, more than the {most} this call can need")
        size = min(most, max(n_slots, 2 * self.max_len, self.max_len + GROWTH))
        filled = max(self.host_lengths)  # slots past every row's write position are never read
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                new = old.new_zeros(*old.shape[:2], size, old.shape[3])
                new[:, :, :filled] = old[:, :, :filled]
                buffers[i] = new
        self.max_len = size

    def advance(self, T: int) -> None:
        """Move every write position on by T (a pass wrote T tokens)."""
        self.lengths += T
        self.host_lengths = [n + T for n in self.host_lengths]

    def rewind(self, lengths: torch.Tensor | list[int]) -> None:
        """Move the write positions back to ``lengths`` (B,): drops everything after them. A
        tensor is read on the host (one synchronisation); a list of ints costs none."""
        if isinstance(lengths, torch.Tensor):
            self.host_lengths = lengths.tolist()
            self.lengths.copy_(lengths)
        else:
            self.host_lengths = list(lengths)
            self.lengths.copy_(torch.tensor(lengths))

    def n_valid(self, T: int) -> int:
        """How many of the next T tokens of all rows are not left padding (from the host copies)."""
        return sum(min(T, max(0, n + T - p)) for n, p in zip(self.host_lengths, self.host_pad))

    def slots(self, T: int) -> torch.Tensor:
        """(B, T) cache slots of the next T tokens."""
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, uniform: int | None) -> None:
        """Store k, v (B, kv_heads, T, hd) at slots (B, T); ``uniform`` is the shared first slot
        when all rows write the same contiguous slots (a plain slice then suffices)."""
        if uniform is not None:
            T = k.shape[2]
            self.k[layer][:, :, uniform : uniform + T] = k
            self.v[layer][:, :, uniform : uniform + T] = v
            return
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[layer][rows, :, slots] = k.transpose(1, 2)  # advanced indices first: (B, T, kv_heads, hd)
        self.v[layer][rows, :, slots] = v.transpose(1, 2)

    def copy_from_below(self, layer: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Copy layer-1's entries at (rows[i], slots[i]) into ``layer`` (the paper's K/V fill)."""
        self.k[layer][rows, :, slots] = self.k[layer - 1][rows, :, slots]
        self.v[layer][rows, :, slots] = self.v[layer - 1][rows, :, slots]
