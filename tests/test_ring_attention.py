"""Ring attention (``fused_kernels.distributed``) across 2 and 4 gloo processes on the CPU: output and dq/dk/dv of every
rank equal single-process ``fused_kernels.attention`` on the gathered sequence (and the float64 reference), on the
Triton kernels (interpreter) and on the PyTorch path.

One ``torch.multiprocessing.spawn`` per world size runs every case on both backends (process start-up and
imports dominate the cost); each case's verdict comes back per rank and is asserted by its own test."""

from __future__ import annotations

import datetime
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close

import fused_kernels
from fused_kernels import distributed as kd
from fused_kernels.reference import attention_ref

BACKENDS = ("triton", "torch")

# name: (batch, heads, kv heads, L_local, head dim, value head dim, causal, layout, seqlens_k as fractions of
# the whole length, dtype)
CASES = {
    "plain": (1, 2, 2, 16, 16, 16, False, "contiguous", None, torch.float32),
    "causal": (1, 2, 2, 20, 16, 16, True, "contiguous", None, torch.float32),
    "causal-zigzag": (1, 2, 2, 24, 16, 16, True, "zigzag", None, torch.float32),
    "gqa-causal-zigzag": (1, 4, 2, 16, 16, 16, True, "zigzag", None, torch.float32),
    "mqa-plain-zigzag": (1, 2, 1, 18, 16, 16, False, "zigzag", None, torch.float32),
    "value-dim-causal": (1, 2, 1, 20, 16, 8, True, "contiguous", None, torch.float32),
    # a batch entry with no key at all (output 0, zero gradients) and one that ends inside a rank's slice
    "seqlens-causal-zigzag": (2, 2, 2, 16, 16, 16, True, "zigzag", (0.0, 0.6), torch.float32),
    "seqlens-plain": (2, 2, 1, 16, 16, 16, False, "contiguous", (0.1, 0.9), torch.float32),
    "float64-gqa-causal": (1, 4, 1, 16, 16, 16, True, "contiguous", None, torch.float64),
    "bfloat16-gqa-causal-zigzag": (1, 4, 2, 16, 16, 16, True, "zigzag", None, torch.bfloat16),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_case(rank: int, world: int, case: tuple, group: dist.ProcessGroup | None = None) -> None:
    b, h, hkv, length, d, dv, causal, layout, fractions, dtype = case
    total = length * world
    gen = torch.Generator().manual_seed(1234 + total)
    q, do = (torch.randn(b, h, total, n, generator=gen, dtype=torch.float64) for n in (d, dv))
    k = torch.randn(b, hkv, total, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, total, dv, generator=gen, dtype=torch.float64)
    seqlens = None if fractions is None else torch.tensor([int(f * total) for f in fractions])
    pos = kd.shard_positions(total, world, rank, layout)
    # strided as a model's heads are (views of (B, L, H, D)), last dim contiguous
    local = [t[:, :, pos].to(dtype).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    out = kd.ring_attention(*local, group=group, causal=causal, layout=layout, seqlens_k=seqlens)
    got = (out, *torch.autograd.grad(out, local, do[:, :, pos].to(dtype)))

    # One process, the whole sequence. Ring attention's seqlens_k pads a self-attention (query i at position i,
    # keys past seqlens_k masked): a key-padding mask, not attention()'s seqlens_k, which aligns each row's
    # causal diagonal with its last valid key (a KV cache).
    keys = None if seqlens is None else (torch.arange(total) < seqlens[:, None])[:, None, None, :]
    full = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    single = fused_kernels.attention(*full, causal=causal, attn_mask=keys)
    single = (single, *torch.autograd.grad(single, full, do.to(dtype)))
    exact = [t.clone().requires_grad_() for t in (q, k, v)]         # float64 reference
    ref = attention_ref(*exact, causal=causal, attn_mask=keys)
    ref = (ref, *torch.autograd.grad(ref, exact, do))
    for name, mine, one, want in zip(("out", "dq", "dk", "dv"), got, single, ref):
        if dtype in (torch.float16, torch.bfloat16):   # the 2x rule: single-process attention's error is the yardstick
            assert_close(mine, want[:, :, pos], one[:, :, pos], name=name, grad=name != "out")
            continue
        assert_close(mine, one[:, :, pos], name=f"{name} vs one process", grad=name != "out")
        assert_close(mine, want[:, :, pos].to(dtype), name=f"{name} vs float64", grad=name != "out")
    if layout == "zigzag":
        full_out = kd.zigzag_unshard(out.detach(), group, dim=2)
        assert torch.equal(full_out[:, :, pos], out.detach())
        if dtype not in (torch.float16, torch.bfloat16):
            assert_close(full_out, single[0], name="zigzag_unshard(out)")
    if seqlens is not None and int(seqlens.min()) == 0:
        dead = seqlens == 0
        assert bool((out[dead] == 0).all()) and bool((got[1][dead] == 0).all())


def _expect(error: type, text: str, fn) -> None:
    try:
        fn()
    except error as e:
        assert text in str(e), f"{error.__name__} without {text!r}: {e}"
        return
    raise AssertionError(f"no {error.__name__} ({text!r})")


def _check_errors(rank: int, world: int) -> None:
    x = torch.randn(1, 2, 8, 16)
    # L_local differs between ranks: found by the all-gather of shapes, on every rank
    mine = torch.randn(1, 2, 8 + 2 * (rank > 0), 16)
    _expect(ValueError, "ranks disagree", lambda: kd.ring_attention(mine, mine, mine))
    _expect(ValueError, "must divide q heads", lambda: kd.ring_attention(torch.randn(1, 3, 8, 16), x, x))
    _expect(ValueError, "dropout_p must be 0", lambda: kd.ring_attention(x, x, x, dropout_p=0.1))
    _expect(ValueError, "even L_local", lambda: kd.ring_attention(x[:, :, :7], x[:, :, :7], x[:, :, :7],
                                                                  layout="zigzag"))
    _expect(ValueError, "layout must be one of", lambda: kd.ring_attention(x, x, x, layout="striped"))
    _expect(ValueError, "same positions", lambda: kd.ring_attention(x, x[:, :, :4], x[:, :, :4]))
    _expect(ValueError, "4-D", lambda: kd.ring_attention(x[0], x[0], x[0]))
    _expect(TypeError, "group must be", lambda: kd.ring_attention(x, x, x, group="world"))
    _expect(TypeError, "causal must be a bool", lambda: kd.ring_attention(x, x, x, causal=1))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for backend in BACKENDS:
            with fused_kernels.use_backend(backend):
                for name, case in [*CASES.items(), ("errors", None)]:
                    try:
                        _check_case(rank, world, case) if case else _check_errors(rank, world)
                        results[f"{backend}/{name}"] = None
                    except AssertionError as e:     # raised after all communication: the ring is intact
                        results[f"{backend}/{name}"] = str(e)
        # sub-groups: ranks {0, 1} and {2, 3} run rings of their own (context parallel inside data parallel)
        if world == 4:
            subs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            with fused_kernels.use_backend("torch"):
                try:
                    _check_case(rank % 2, 2, CASES["gqa-causal-zigzag"], subs[rank // 2])
                    results["subgroups"] = None
                except AssertionError as e:
                    results["subgroups"] = str(e)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}procs")
def verdicts(request, tmp_path_factory) -> tuple[int, dict[str, list[str | None]]]:
    world = request.param
    out = tmp_path_factory.mktemp(f"ring{world}")
    mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return world, {key: [res.get(key) for res in per_rank] for key in per_rank[0]}


@pytest.mark.parametrize("case", [f"{b}/{name}" for b in BACKENDS for name in [*CASES, "errors"]])
def test_ring_attention_matches_one_process(verdicts, case):
    world, results = verdicts
    assert case in results, f"case {case} did not run"
    failures = [f"rank {r}: {err}" for r, err in enumerate(results[case]) if err is not None]
    assert not failures, "\n".join(failures)


def test_rings_on_subgroups(verdicts):
    world, results = verdicts
    if world != 4:
        pytest.skip("sub-groups of 2 are checked with 4 processes")
    assert results["subgroups"] == [None] * 4


def test_not_initialized_is_a_clear_error():
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="not initialized"):
        kd.ring_attention(x, x, x)


def test_layout_helpers_round_trip():
    pos = [kd.shard_positions(16, 4, r, "zigzag").tolist() for r in range(4)]
    assert pos[0] == [0, 1, 14, 15] and pos[3] == [6, 7, 8, 9]
    assert sorted(p for ps in pos for p in ps) == list(range(16))
    assert kd.shard_positions(12, 3, 1).tolist() == [4, 5, 6, 7]
    x = torch.arange(16.0).view(1, 16, 1)
    assert kd.zigzag_shard(x, 4, 1, dim=1).flatten().tolist() == [2, 3, 12, 13]
    with pytest.raises(ValueError, match="divisible by 8"):
        kd.shard_positions(12, 4, 0, "zigzag")
    with pytest.raises(ValueError, match="rank 4"):
        kd.shard_positions(16, 4, 4)
