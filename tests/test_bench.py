"""The benchmark harness (``python -m bench``) end to end on the CPU: tiny shapes through the PyTorch path.

These tests check the harness (records, table, plots, skips, work formulas), never a speed."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_kernels
from bench import attention, models, norms, run
from bench.harness import REGISTRY, Case, Env, Prepared, Provider, Sink, Timer, Unsupported, run_cases
from fused_kernels.reference import attention_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"family", "op", "mode", "shape", "dtype", "provider", "status", "reason", "ms", "gpu", "versions",
            "metric", "device"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU harness test (GPU runs use gpu_check.sh)")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = run.main(["--quick", "--out", str(out)])
    return code, out, json.loads((out / "bench.json").read_text())


def test_quick_run_writes_records_table_and_plots(quick_run):
    code, out, records = quick_run
    assert code == 0
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["status"] in ("ok", "skipped", "error")
        assert r["device"] == "cpu" and r["versions"]["torch"] == torch.__version__
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["family"] for r in ok} == {"ceiling", "attention", "norm", "softmax", "model"}
    for r in ok:
        assert r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r[r["metric"]] > 0, r
    assert not [r for r in records if r["status"] == "error"]
    # ours ran for every op of every family, through the PyTorch path on the CPU
    ours = {(r["family"], r["op"], r["mode"]) for r in ok if r["provider"] == "ours"}
    for fam_op in [("attention", "attention", "fwd"), ("attention", "attention", "fwd+bwd"),
                   ("attention", "decode", "fwd"), ("norm", "layer_norm", "fwd+bwd"), ("norm", "rms_norm", "fwd"),
                   ("norm", "add_layer_norm", "fwd+bwd"), ("softmax", "softmax", "fwd"),
                   ("softmax", "softmax_masked", "fwd+bwd"), ("model", "gpt2", "train"),
                   ("model", "bert-base", "infer"), ("model", "vit-b16", "infer")]:
        assert fam_op in ours
    assert all(r["impl"] == "fast_torch" for r in ok if r["provider"] == "ours")
    # every baseline that ran computed the same function as ours (same inputs, same weights)
    checked = [r for r in ok if r["provider"] != "ours" and r["rel_err_vs_ours"] is not None]
    assert checked and all(r["agrees_with_ours"] for r in checked)
    # no percentages of the CPU's "ceilings" (a cache-sized copy, a small matmul: other ops beat them)
    assert all(r["pct_matmul"] is None and r["pct_copy"] is None for r in records)
    summary = (out / "summary.md").read_text()
    assert "| ours / best |" in summary and "they are not speeds" in summary
    assert "| attention | attention | fwd | bf16 |" in summary and "| model | gpt2 | train |" in summary
    header = next(line for line in summary.splitlines() if line.startswith("| family |"))
    column = header.split("|").index(" % ceiling ")
    rows = [line for line in summary.splitlines() if line.startswith("| ") and line != header]
    assert rows and all(line.split("|")[column] == "  " for line in rows)   # the column left empty
    assert "% ceiling column stays empty" in summary


def test_help_is_plain_text(capsys):
    from bench import cpu
    for parse in (run.parse, cpu.parse):
        with pytest.raises(SystemExit):
            parse(["--help"])
        out = capsys.readouterr().out
        assert out.startswith("usage: python -m bench") and "``" not in out


def test_percent_of_ceiling_on_a_gpu_is_of_the_ceilings_measured_in_the_run():
    from bench.harness import record
    from bench.report import table
    env = Env("cuda", "a GPU", 50 << 20, True, {"torch": "x"}, copy_gbps=3000.0, matmul_tflops=800.0)
    att = record(env, dict(family="attention", op="attention", mode="fwd", grid="standard", dtype="bf16",
                           shape={}, provider="ours", status="ok", reason=None, metric="tflops", label="L"),
                 None, tflops=400.0)
    ln = record(env, dict(family="norm", op="layer_norm", mode="fwd", grid="rows", dtype="bf16", shape={},
                          provider="ours", status="ok", reason=None, metric="gbps", label="N"), None, gbps=2400.0)
    assert math.isclose(att["pct_matmul"], 50.0) and att["pct_copy"] is None
    assert math.isclose(ln["pct_copy"], 80.0) and ln["pct_matmul"] is None
    assert "| 50.0 |" in table([att, ln], env) and "| 80.0 |" in table([att, ln], env)
    cpu = Env("cpu", "cpu", 1 << 20, True, {"torch": "x"}, copy_gbps=3000.0, matmul_tflops=800.0)
    assert record(cpu, dict(metric="tflops"), None, tflops=4000.0)["pct_matmul"] is None


def test_quick_run_writes_plots(quick_run):
    # matplotlib comes with the "bench" extra; without it the run still writes records and the table
    pytest.importorskip("matplotlib")
    _, out, _ = quick_run
    for png in ("attention.png", "attention_shapes.png", "norms.png", "models.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_providers_are_recorded_as_skipped(quick_run):
    _, _, records = quick_run
    skipped = {(r["family"], r["provider"]): r["reason"] for r in records if r["status"] == "skipped"}
    for fam, prov in [("attention", "flash-attn"), ("attention", "fa3"), ("attention", "flex"),
                      ("attention", "sdpa-cudnn"), ("norm", "liger"), ("norm", "apex"), ("norm", "torch-compile"),
                      ("softmax", "torch-compile"), ("model", "ours-compile"), ("model", "torch-sdpa-compile")]:
        assert skipped.get((fam, prov)), (fam, prov)
    assert all(r["ms"] is None for r in records if r["status"] == "skipped")


def test_only_filters_families(tmp_path):
    assert run.main(["--quick", "--only", "softmax", "--out", str(tmp_path), "--no-plots"]) == 0
    records = json.loads((tmp_path / "bench.json").read_text())
    assert {r["family"] for r in records} == {"ceiling", "softmax"}
    assert not list(tmp_path.glob("*.png"))


def test_interrupted_run_still_writes_its_files(tmp_path, monkeypatch):
    from bench.harness import Interrupted

    def stop(env):
        raise Interrupted("test")
    monkeypatch.setitem(run.CASES, "norm", stop)
    assert run.main(["--quick", "--only", "softmax", "--only", "norm", "--out", str(tmp_path), "--no-plots"]) == 2
    records = json.loads((tmp_path / "bench.json").read_text())
    assert [r["op"] for r in records] == ["copy", "matmul"]       # stopped before the first norm case
    assert (tmp_path / "summary.md").exists()


def test_run_cases_skips_and_errors():
    env = Env.detect(quick=True)
    env.copy_gbps = env.matmul_tflops = 1.0
    case = Case("norm", "layer_norm", "fwd", "rows", "bf16", dict(M=2, N=4), "gbps", bytes=64)
    x = torch.ones(4)

    def fine(c, e):
        return Prepared(lambda: x + 1, output=lambda: x)

    def unsupported(c, e):
        raise Unsupported("no such kernel")

    def broken(c, e):
        raise RuntimeError("No available kernel")

    def wrong(c, e):
        return Prepared(lambda: x, output=lambda: -x)

    sink = Sink(None)
    providers = [Provider("ours", fine), Provider("a", unsupported), Provider("b", broken),
                 Provider("c", fine, lambda e: "c not installed"), Provider("d", wrong), Provider("e", fine)]
    case.skip["e"] = "grid says no"
    run_cases([case], providers, env, Timer(env), sink, log=lambda s: None)
    by = {r["provider"]: r for r in sink.records}
    assert by["ours"]["status"] == "ok" and by["ours"]["gbps"] == pytest.approx(64 / by["ours"]["ms"] / 1e6)
    assert (by["a"]["status"], by["a"]["reason"]) == ("skipped", "no such kernel")
    assert by["b"]["status"] == "skipped" and "No available kernel" in by["b"]["reason"]
    assert (by["c"]["status"], by["c"]["reason"]) == ("skipped", "c not installed")
    assert by["d"]["status"] == "ok" and by["d"]["agrees_with_ours"] is False
    assert (by["e"]["status"], by["e"]["reason"]) == ("skipped", "grid says no")
    # ours failing is an error, not a skip
    sink = Sink(None)
    run_cases([case], [Provider("ours", broken)], env, Timer(env), sink, log=lambda s: None)
    assert sink.records[0]["status"] == "error"
    # past the deadline nothing more is started
    sink = Sink(None)
    run_cases([case], [Provider("ours", fine)], env, Timer(env), sink, deadline=0.0, log=lambda s: None)
    assert sink.records[0]["status"] == "skipped" and "budget" in sink.records[0]["reason"]


def test_attention_flops_by_hand():
    # B=2, H=3, L=S=128, D=64: 4 * 2 * 3 * 128 * 128 * 64 = 25,165,824 FLOPs forward
    assert attention.attention_flops(2, 3, 128, 128, 64) == 25_165_824
    assert attention.attention_flops(2, 3, 128, 128, 64, causal=True) == 12_582_912          # halved
    assert attention.attention_flops(2, 3, 128, 128, 64, mode="bwd") == 62_914_560          # 2.5x
    assert attention.attention_flops(2, 3, 128, 128, 64, mode="fwd+bwd") == 88_080_384      # 3.5x
    assert attention.attention_flops(2, 3, 128, 128, 64, causal=True, mode="fwd+bwd") == 44_040_192
    # padding: only valid keys count (lengths 100 and 28 instead of 2 x 128)
    assert attention.attention_flops(2, 3, 128, 128, 64, valid_keys=128) == 25_165_824 // 2


def test_decode_and_norm_bytes_by_hand():
    # K and V of (B=4, Hkv=2, S=1024, D=64) in bf16: 2 * 4 * 2 * 1024 * 64 * 2 bytes
    assert attention.decode_bytes(4, 2, 1024, 64, 2) == 2_097_152
    case = next(c for c in attention.cases(Env.detect(quick=True)) if c.op == "decode")
    sh = case.shape
    assert case.bytes == 2 * sh["B"] * sh["Hkv"] * sh["S"] * sh["D"] * 2
    # layer_norm forward on (M=4, N=8) bf16 with bf16 weight and bias: x read + y written (2 * 64 bytes)
    # + weight and bias read (2 * 16 bytes)
    assert norms.norm_bytes("layer_norm", "fwd", 4, 8, 2) == 160
    # + backward: x, dy read and dx written (3 * 64), weight read, dweight and dbias written (3 * 16)
    assert norms.norm_bytes("layer_norm", "fwd+bwd", 4, 8, 2) == 160 + 240
    assert norms.norm_bytes("add_layer_norm", "fwd", 4, 8, 2) == 4 * 64 + 2 * 16
    assert norms.norm_bytes("softmax", "fwd+bwd", 4, 8, 2, mask_bytes=8) == 2 * 64 + 8 + 3 * 64


def test_sdpa_baseline_matches_our_attention_semantics():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    lens = torch.tensor([9, 6])
    pad = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    for kw in [dict(causal=True), dict(seqlens_k=lens), dict(causal=True, seqlens_k=lens), dict(attn_mask=pad),
               dict(causal=True, attn_mask=torch.zeros(5, 9, dtype=torch.float64))]:
        torch.testing.assert_close(models.sdpa_attention(q, k, v, **kw), attention_ref(q, k, v, **kw))
    q = k = v = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(models.sdpa_attention(q, k, v, causal=True), attention_ref(q, k, v, causal=True))


def test_torch_ops_swaps_and_restores_the_kernels():
    before = fused_kernels.attention, fused_kernels.add_layer_norm, fused_kernels.nn.layer_norm
    with models.torch_ops():
        assert fused_kernels.attention is models.sdpa_attention
        x, r = torch.randn(3, 8), torch.randn(3, 8)
        out, res = fused_kernels.add_layer_norm(x, r)
        torch.testing.assert_close(res, x + r)
        torch.testing.assert_close(out, torch.nn.functional.layer_norm(x + r, (8,)))
    assert (fused_kernels.attention, fused_kernels.add_layer_norm, fused_kernels.nn.layer_norm) == before


def test_every_family_has_ours_first():
    for family in ("attention", "norm", "softmax", "model"):
        assert REGISTRY.providers(family)[0].name == "ours"


def test_pytest_benchmark_entry_point(tmp_path):
    pytest.importorskip("pytest_benchmark")
    # an xdist worker's PYTEST_* variables would make pytest-benchmark believe it runs in parallel
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}
    env["BENCH_ROUNDS"] = "2"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-k", "layer_norm-fwd- or decode", "--benchmark-json", str(tmp_path / "pb.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "pb.json").read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert any("decode" in n and n.endswith("-ours]") for n in names)
    assert all(b["extra_info"].get("gbps", 0) > 0 for b in data["benchmarks"])


# ----------------------------------------------------------------------------- python -m bench --device cpu


def _clean_env() -> dict[str, str]:
    """What a user's shell has: no interpreter, no forced backend, no pytest worker variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FUSED_KERNELS_BACKEND") and not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_cpu_benchmark_smoke_run(tmp_path):
    """Every family and kind through the CPU benchmark (tiny shapes, no memory processes): a table row per
    case and mode with both providers timed, what the CPU tensors ran recorded as the PyTorch path."""
    proc = subprocess.run([sys.executable, "-m", "bench", "--device", "cpu", "--smoke", "--no-memory", "--out",
                           str(tmp_path)], cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "cpu.json").read_text())
    records = data["records"]
    assert {r["family"] for r in records} == {"attention", "softmax", "norm", "model", "linear_ce", "rotary",
                                              "gated_mlp"}
    assert all(r["ours_ms"] > 0 and r["torch_ms"] > 0 and r["pairs"] >= 2 for r in records)
    assert {r["mode"] for r in records} == {"fwd", "fwd+bwd", "train"}
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cores"] >= 1
    table = (tmp_path / "cpu.md").read_text()
    assert "| family | op | case | mode | ours ms | torch ms | ours / torch |" in table
    assert table.count("\n| attention |") == 6 and "| model | vit |" in table and "| model | llama |" in table
    # two pairs of microseconds are noise: marked so, never bold, never counted above the target
    assert all(r["noise"] for r in records) and "**" not in table and "(noise)" in table, table
    assert "0 above 1.05x in time" in table and "are noise, not results" in table, table


def test_cpu_grid_times_attention_at_short_sequences():
    """The CPU grid has attention at L = 16-128 (one batch entry), where the per-call Python work shows; each
    case is timed against torch in the same run."""
    from bench import cpu
    short = {(c["L"], c["mask"]) for c in cpu.grid(only=["attention"]) if c["B"] == 1}
    assert short == {(l, m) for l in (16, 32, 64, 128) for m in ("none", "causal")}


def test_cpu_benchmark_memory_child():
    """The peak-memory process of one case: a forward peak at least the output's size, and a larger
    forward + backward peak."""
    spec = {"family": "norm", "op": "layer_norm", "M": 1024, "N": 1024}          # 4 MiB per tensor
    proc = subprocess.run([sys.executable, "-m", "bench.cpu", "--child", json.dumps(spec), "ours"], cwd=ROOT,
                          env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 3.5 <= found["fwd_mb"] < found["fwd+bwd_mb"] < 100, found


def test_cpu_benchmark_refuses_the_interpreter(monkeypatch):
    from bench import cpu
    monkeypatch.setattr(fused_kernels._core.backend, "INTERPRET", True)
    assert cpu.main(["--smoke", "--no-memory"]) == 2


def _variant_cases(env: Env) -> list[Case]:
    return [c for c in attention.cases(env) if c.grid == "variants"]


def test_variant_cases_on_the_gpu_grid_and_the_cpu():
    gpu = Env("cuda", "fake", 50 << 20, quick=False)
    cases = _variant_cases(gpu)
    assert {(c.shape["variant"], c.mode, c.shape["L"]) for c in cases} == {
        (v, m, l) for v in attention.VARIANTS for m in ("fwd", "fwd+bwd") for l in (4096, 16384)}
    for c in cases:
        sh = c.shape
        assert c.dtype == "bf16" and sh["B"] * sh["L"] == 16384 and sh["D"] == 128 and sh["H"] == 16 and sh["causal"]
        assert c.op == "attention_" + sh["variant"] and c.flops > 0
    window = next(c for c in cases if c.shape["variant"] == "window")
    assert window.shape["W"] == 1024 and "window W1024" in window.label()
    assert not _variant_cases(Env("cuda", "fake", 50 << 20, quick=True))     # full run only
    assert {c.shape["variant"] for c in _variant_cases(Env.detect())} == set(attention.VARIANTS)


def test_variant_flops_count_the_unmasked_pairs():
    for c in _variant_cases(Env.detect()):
        b, h, _, l, s, d = attention._dims(c)
        keep = attention.variant_mask(c, "cpu")
        pairs = b * l * (l + 1) // 2 if keep is None else int(keep.expand(b, 1, l, s).sum())
        assert attention.variant_pairs(c.shape["variant"], b, l, s) == pairs
        assert c.flops == 4.0 * h * d * pairs * {"fwd": 1.0, "fwd+bwd": 3.5}[c.mode]
    assert attention.variant_pairs("window", 1, 4096, 4096) == 1024 * 1025 // 2 + (4096 - 1024) * 1024
    docs = attention.document_lengths(4, 4096)
    assert all(sum(r) == 4096 and len(r) > 1 for r in docs)


def test_variant_baselines_compute_what_ours_computes():
    """FlexAttention's mods (run eagerly on the CPU here), SDPA's materialized masks and flash-attn's
    arguments describe the same attention as ours' variant arguments."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    env = Env.detect()
    for c in _variant_cases(env):
        if c.mode != "fwd":
            continue
        b, h, _, l, s, d = attention._dims(c)
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, l, d, dtype=torch.float64) for _ in range(3))
        with fused_kernels.use_backend("torch"):
            ref = fused_kernels.attention(q, k, v, causal=True, **attention.ours_variant_kwargs(c, env))
        mask_mod, score_mod, per_batch = attention.flex_variant_mods(c, env)
        block_mask = flex.create_block_mask(mask_mod, b if per_batch else None, None, l, s, device="cpu")
        with _quiet():
            out = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
        torch.testing.assert_close(out, ref, msg=c.label())
        if c.shape["variant"] == "softcap":
            with pytest.raises(Unsupported):
                attention.sdpa_variant_mask(c, env, torch.float64)
        else:
            mask = attention.sdpa_variant_mask(c, env, torch.float64)
            torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), ref, msg=c.label())
        if c.shape["variant"] in ("document", "prefix"):
            with pytest.raises(Unsupported):
                attention.flash_variant_kwargs(c, env)
        else:
            kw = attention.flash_variant_kwargs(c, env)
            assert set(kw) == {"window": {"window_size"}, "alibi": {"alibi_slopes"},
                               "softcap": {"softcap"}}[c.shape["variant"]]
    alibi = next(c for c in _variant_cases(env) if c.shape["variant"] == "alibi")
    with pytest.raises(Unsupported):
        attention.flash_variant_kwargs(alibi, env, "flash_attn_interface")      # FA3 has no ALiBi


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # eager flex_attention warns that it is not compiled
        yield


def test_cpu_benchmark_linear_cross_entropy_child():
    """The peak-memory process of a linear cross-entropy case on each side: ours holds a fraction of the unfused
    form's (N, V) logits (N 1024, V 8192, fp32: 32 MiB of logits)."""
    spec = {"family": "linear_ce", "op": "linear_cross_entropy", "N": 1024, "H": 64, "V": 8192}
    found = {}
    for provider in ("ours", "torch"):
        proc = subprocess.run([sys.executable, "-m", "bench.cpu", "--child", json.dumps(spec), provider], cwd=ROOT,
                              env=_clean_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        found[provider] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["torch"]["fwd+bwd_mb"] >= 64, found                    # logits and their gradient at least
    assert found["ours"]["fwd+bwd_mb"] < 0.5 * found["torch"]["fwd+bwd_mb"], found
