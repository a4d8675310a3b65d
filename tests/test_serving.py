"""GPT over the paged KV cache: ``GPT.generate`` on a list of prompts of different lengths and the continuous
batching of ``transformer.serving.serve`` give every prompt the greedy tokens it gets alone (the dense
``KVCache`` path), with fewer slots than prompts so that finished sequences hand their slot and blocks on;
and ``python -m transformer generate RUN --prompts FILE``."""

import pytest
import torch
from helpers import bounds_checked
from torch import nn

import fused_kernels
from transformer import GPT, GPTConfig, serving
from transformer.training.cli import main
from transformer.training.trainer import TrainArgs, load_run, train


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lively(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> GPT:
    """The tiny preset, no dropout, weights re-drawn wide (std 0.3) so that greedy decoding of an untrained
    model does not collapse to one repeated token."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("tiny", dropout=0.0, attn_dropout=0.0, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.3)
    return model


def _prompts(lengths, seed=1, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def _alone(model, prompts, max_new_tokens, **kw):
    return [model.generate(p[None], max_new_tokens, **kw)[0] for p in prompts]


@pytest.mark.parametrize("max_batch, block_size", [(2, 16), (3, 4)])
def test_continuous_batching_gives_each_prompt_its_tokens_alone(monkeypatch, max_batch, block_size):
    model = _lively()
    prompts = _prompts([1, 13, 4, 30, 7, 2, 21])
    batches = []
    real = serving._step
    monkeypatch.setattr(serving, "_step", lambda m, c, seqs, *a: batches.append(list(seqs)) or real(m, c, seqs, *a))
    with fused_kernels.use_backend("torch"):
        outs = serving.serve(model, prompts, 9, max_batch=max_batch, block_size=block_size)
        want = _alone(model, prompts, 9)
    for out, ref in zip(outs, want):
        assert torch.equal(out, ref)
    assert len({t for o, p in zip(outs, prompts) for t in o[len(p):].tolist()}) > 5   # not one repeated token
    assert max(len(b) for b in batches) == max_batch
    # every prompt past the first max_batch decodes in a slot a finished sequence freed
    decode_batches = [set(b) for b in batches if len(b) > 1]
    assert all(any(i in b for b in decode_batches) for i in range(max_batch, 2 * max_batch))


def test_a_small_pool_makes_prompts_wait_for_blocks():
    model = _lively()
    prompts = _prompts([20, 3, 17, 9])
    with fused_kernels.use_backend("torch"):
        outs = serving.serve(model, prompts, 6, max_batch=4, block_size=8, num_blocks=4)   # 2 sequences at most
        want = _alone(model, prompts, 6)
    assert all(torch.equal(o, w) for o, w in zip(outs, want))
    with pytest.raises(ValueError, match="the pool has 2"):
        serving.serve(model, prompts, 6, block_size=8, num_blocks=2)


def test_generate_on_a_list_stops_each_sequence_at_eos():
    model = _lively(1)
    prompts = _prompts([5, 11, 2], seed=3)
    with fused_kernels.use_backend("torch"):
        free = _alone(model, prompts, 8)
        eos = int(free[1][len(prompts[1]) + 2])                    # the third new token of prompt 1
        outs = model.generate(prompts, 8, eos_token_id=eos, max_batch=2)
    for out, ref, p in zip(outs, free, prompts):
        new = ref[len(p):].tolist()
        cut = new.index(eos) + 1 if eos in new else len(new)
        assert torch.equal(out, ref[:len(p) + cut])
    assert len(outs[1]) == len(prompts[1]) + 3


def test_continuous_batching_on_the_triton_kernels():
    """The same on the Triton kernels (the interpreter on a CPU): paged append + paged attention."""
    model = _lively(2, n_layers=1)
    prompts = _prompts([6, 1, 10], seed=4)
    with bounds_checked("_paged_append_kernel", "_paged_attn_fwd_kernel") as launches:
        outs = model.generate(prompts, 4, max_batch=2)
    assert launches["_paged_append_kernel"] == launches["_paged_attn_fwd_kernel"] > 0
    want = _alone(model, prompts, 4)
    assert all(torch.equal(o, w) for o, w in zip(outs, want))


def test_bad_requests():
    model = _lively()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        serving.serve(model, _prompts([60]), 5)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        serving.serve(model, [torch.tensor([1]), torch.tensor([], dtype=torch.long)], 2)
    with pytest.raises(ValueError, match="no attention_mask"):
        model.generate(_prompts([3]), 2, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="max_batch"):
        serving.serve(model, _prompts([3]), 2, max_batch=0)
    assert [p.tolist() for p in serving.serve(model, _prompts([3, 4]), 0)] == [p.tolist() for p in _prompts([3, 4])]


def test_cli_generate_prompts_file_prints_one_continuation_per_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    train(TrainArgs(task="gpt", preset="tiny", out=out, steps=2, eval_every=2, eval_batches=1, backend="torch",
                    progress=False, device="cpu"))
    prompts = ["The ", "", "def f(x):\n"[:-1], "a" * 40, "import"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    capsys.readouterr()
    with fused_kernels.use_backend("torch"):
        assert main(["generate", out, "--prompts", str(path), "--max-new-tokens", "12", "--temperature", "0",
                     "--max-batch", "2"]) == 0
        lines = capsys.readouterr().out.splitlines()
        task, model = load_run(out)
        want = [task.generate(model, p, 12, temperature=0)[len(p):] for p in prompts]
    assert lines == [w.replace("\\", "\\\\").replace("\n", "\\n") for w in want]
    assert main(["generate", out, "--prompts", str(path), "--max-new-tokens", "60"]) == 2
    assert "exceeds max_seq_len" in capsys.readouterr().err
