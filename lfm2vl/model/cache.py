"""HybridCache: static preallocated state for LFM2's mixed conv / attention layers.

- attention layer i: K and V buffers (B, Hkv, S_max, Dh), holding keys after k-norm and RoPE;
- conv layer i: the last K-1 columns of the conv input u = B*x, shape (B, D, K-1) (only K-1 ever reach an output);
- `lengths` (B,): tokens stored per row. The caller owns it: forward_cached never advances it (explicit positions).
A `CacheView` binds the cache to one forward call: which rows, their start positions, the key mask, and optionally
how many of the T inputs are real per row (`lengths`: several prompts of different lengths in one prefill pass,
right-padded). A padded row's keys and values past its real tokens land in slots beyond its length, which its queries
never see and its next tokens overwrite; its conv state is taken after its last real token.
Decode (T == 1) keeps every shape static (no .item(), no data-dependent branching), so it can be compiled.
"""
from __future__ import annotations

import torch

from ..config import TextConfig


class HybridCache:
    def __init__(self, cfg: TextConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"cache needs batch_size >= 1 and max_seq_len >= 1, got {batch_size}, {max_seq_len}")
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        kv_shape = (batch_size, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        conv_shape = (batch_size, cfg.hidden_size, cfg.conv_L_cache - 1)
        attn = [t == "full_attention" for t in cfg.layer_types]
        self.k = [torch.zeros(kv_shape, dtype=dtype, device=device) if a else None for a in attn]
        self.v = [torch.zeros(kv_shape, dtype=dtype, device=device) if a else None for a in attn]
        self.conv = [None if a else torch.zeros(conv_shape, dtype=dtype, device=device) for a in attn]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Zero the given rows (all rows by default) and their lengths."""
        sel = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        for t in self.k + self.v + self.conv:
            if t is not None:
                t[sel] = 0
        self.lengths[sel] = 0

    def view(self, start_pos: torch.Tensor, T: int, rows: torch.Tensor | None = None,
             lengths: torch.Tensor | None = None) -> "CacheView":
        return CacheView(self, start_pos, T, rows, lengths)


class CacheView:
    """One forward's access to the cache: rows `rows` (None = all), tokens at start_pos[r] .. start_pos[r]+T-1, of
    which the first lengths[r] are real (None: all T)."""

    def __init__(self, cache: HybridCache, start_pos: torch.Tensor, T: int, rows: torch.Tensor | None,
                 lengths: torch.Tensor | None = None):
        self.cache, self.rows, self.T = cache, rows, T
        b = cache.batch_size if rows is None else rows.shape[0]
        if start_pos.shape != (b,):
            raise ValueError(f"start_pos must have shape ({b},) for {b} cache rows, got {tuple(start_pos.shape)}")
        if lengths is not None and (lengths.shape != (b,) or int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"lengths must be ({b},) real-token counts in [1, {T}], got {lengths.tolist()}")
        self.start_pos, self.lengths = start_pos, lengths
        dev = start_pos.device
        offs = torch.arange(T, device=dev)
        self.positions = start_pos[:, None] + offs  # (b, T)
        if T == 1:
            self.kv_len = cache.max_seq_len  # static shape for decode
        else:
            # prefill: attend over the used prefix only (one host sync per chunk is fine here)
            self.kv_len = int(start_pos.max()) + T
            if self.kv_len > cache.max_seq_len:
                raise ValueError(f"prefill would reach position {self.kv_len} but the cache holds "
                                 f"max_seq_len={cache.max_seq_len} tokens")
        keys = torch.arange(self.kv_len, device=dev)
        self.mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]  # (b, 1, T, S)
        self._fresh = (start_pos > 0)[:, None, None]  # rows starting at 0 begin with an empty conv state

    def last_inputs(self, n: int):
        """For layers that need only each row's last n real inputs: (pick, view), where pick takes those n rows from a
        (b, T, D) tensor of this call's inputs and view is this view narrowed to them (ending at each row's last real
        input, all real). None where there is nothing to narrow (T <= n) or a row has fewer than n real inputs."""
        if self.T <= n:
            return None
        if self.lengths is None:
            return (lambda t: t[:, -n:]), CacheView(self.cache, self.start_pos + self.T - n, n, self.rows)
        if int(self.lengths.min()) < n:
            return None
        idx = self.lengths[:, None] - n + torch.arange(n, device=self.lengths.device)  # (b, n)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.gather(1, idx[:, :, None].expand(-1, -1, t.shape[-1]))

        return pick, CacheView(self.cache, self.start_pos + self.lengths - n, n, self.rows)

    def kv_write(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (b, Hkv, T, Dh) at their positions; return layer i's whole K/V buffers (all cache rows)."""
        kc, vc = self.cache.k[i], self.cache.v[i]
        r = torch.arange(kc.shape[0], device=kc.device) if self.rows is None else self.rows
        idx = (r[:, None], slice(None), self.positions)  # advanced dims first: target (b, T, Hkv, Dh)
        kc[idx] = k.transpose(1, 2).to(kc.dtype)
        vc[idx] = v.transpose(1, 2).to(vc.dtype)
        return kc, vc

    def kv_update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (b, Hkv, T, Dh) at their positions; return the keys/values to attend over (b, Hkv, S, Dh)."""
        kc, vc = self.kv_write(i, k, v)
        if self.T > 1:
            kc, vc = kc[:, :, :self.kv_len], vc[:, :, :self.kv_len]
        if self.rows is not None:
            kc, vc = kc[self.rows], vc[self.rows]  # gathers a copy: slice first
        return kc, vc

    def conv_state(self, i: int) -> torch.Tensor:
        """Layer i's stored conv inputs for these rows (b, D, K-1); zeros for rows starting at position 0."""
        sc = self.cache.conv[i]
        return (sc if self.rows is None else sc[self.rows]) * self._fresh

    def conv_store(self, i: int, state: torch.Tensor) -> None:
        """Write these rows' next conv state (b, D, K-1)."""
        sc = self.cache.conv[i]
        if self.rows is None:
            sc.copy_(state)
        else:
            sc[self.rows] = state.to(sc.dtype)

    def conv_extend(self, i: int, u: torch.Tensor) -> torch.Tensor:
        """Prepend the stored conv state to u (b, D, T) and store the K-1 columns up to each row's last real input."""
        u_ext = torch.cat([self.conv_state(i).to(u.dtype), u], dim=-1)  # (b, D, K-1+T)
        self.conv_store(i, self.conv_tail(u_ext))
        return u_ext

    def conv_tail(self, u_ext: torch.Tensor) -> torch.Tensor:
        """The next conv state (b, D, K-1) from the state-prefixed inputs u_ext (b, D, K-1+T): the K-1 columns that
        end at each row's last real input."""
        K1 = u_ext.shape[-1] - self.T
        if self.lengths is None:
            return u_ext[:, :, -K1:]
        idx = self.lengths[:, None] + torch.arange(K1, device=u_ext.device)  # (b, K-1) columns of u_ext
        return u_ext.gather(2, idx[:, None, :].expand(-1, u_ext.shape[1], -1))
