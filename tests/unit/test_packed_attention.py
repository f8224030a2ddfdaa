"""Packed rows' attention from host-found bounds equals the block-diagonal causal attention.

The flash kernel needs CUDA, so a reference with the same signature (each sequence on its own,
causal) stands in for it here: the test covers the bounds, the layout changes and the grouped
heads around the kernel; the lent GPU runs the real one (bench/service_throughput.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer import packed_attention
from trainer.data.batch import collate, model_inputs
from trainer.data.dataset import pack


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, scale=None):
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [heads, n, d]
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=is_causal, scale=scale).transpose(0, 1)
    return out


def test_bounds_split_rows_at_every_restart_and_every_row() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0, 1]])
    bounds, longest = packed_attention.sequence_bounds(positions)
    assert bounds.tolist() == [0, 3, 5, 9, 15, 16, 18] and longest == 6


def test_attention_equals_the_block_diagonal_causal_mask(monkeypatch) -> None:
    monkeypatch.setattr(packed_attention, "_varlen", lambda: _reference_varlen)
    packed_attention._params = None
    examples = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (5, 3, 7, 2, 6)]
    batch = packed_attention.with_bounds(collate(pack(examples, 12), pad_id=0))
    inputs = model_inputs(batch, "cpu")
    b, s = batch["input_ids"].shape
    heads, kv_heads, d = 4, 2, 8
    torch.manual_seed(0)
    q, k, v = torch.randn(b, heads, s, d), torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    got, _ = packed_attention.attention(None, q, k, v, None, scaling=d**-0.5,
                                        tuneq_cu_seqlens=inputs["tuneq_cu_seqlens"],
                                        tuneq_max_seqlen=inputs["tuneq_max_seqlen"])
    pos = batch["position_ids"]
    seq_id = (pos == 0).cumsum(-1)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    mask = (seq_id[:, :, None] == seq_id[:, None, :]) & causal  # [b, s, s]
    rep = heads // kv_heads
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask[:, None], scale=d**-0.5).transpose(1, 2)
    assert got.shape == (b, s, heads, d)
    torch.testing.assert_close(got, want)


def test_off_switch_and_cpu(monkeypatch) -> None:
    assert not packed_attention.available(torch.device("cpu"))
    monkeypatch.setenv("TUNEQ_PACKED_ATTENTION", "0")
    assert not packed_attention.available(torch.device("cuda"))
