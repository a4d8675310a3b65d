"""What a run leaves behind besides the JSON records: the summary table (ours vs the best other provider)
and the PNG plots."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

from bench.harness import Env

UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_s": "tokens/s"}
PCT = {"tflops": "pct_matmul", "gbps": "pct_copy"}


def _key(r: dict[str, Any]) -> tuple:
    return (r["family"], r["op"], r["mode"], r["grid"], r["dtype"], r.get("label", ""))


def _value(r: dict[str, Any]) -> float | None:
    return r.get(r.get("metric") or "") if r.get("status") == "ok" else None


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per case: ours, the best other provider that ran, and ours / best (higher is better)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["family"] != "ceiling":
            groups[_key(r)].append(r)
    rows = []
    for key, recs in groups.items():
        ours = next((r for r in recs if r["provider"] == "ours"), None)
        others = [r for r in recs if r["provider"] != "ours" and _value(r) is not None]
        best = max(others, key=lambda r: _value(r) or 0.0, default=None)
        ov, bv = (_value(ours) if ours else None), (_value(best) if best else None)
        metric = recs[0].get("metric")
        rows.append(dict(
            family=key[0], op=key[1], mode=key[2], grid=key[3], dtype=key[4], label=key[5], metric=metric,
            ours=ov, ours_status=ours["status"] if ours else "missing",
            ours_pct=ours.get(PCT.get(metric, ""), None) if ours else None,
            best=best["provider"] if best else None, best_value=bv,
            best_disagrees=bool(best and best.get("agrees_with_ours") is False),
            ratio=ov / bv if ov and bv else None,
            notes=_notes(ours, best),
        ))
    return rows


def _notes(ours: dict[str, Any] | None, best: dict[str, Any] | None) -> str:
    """Peak memory of the model runs (ours / best other), when measured."""
    mems = [(r["provider"], r.get("peak_mem_gb")) for r in (ours, best) if r and r.get("peak_mem_gb") is not None]
    return ", ".join(f"{p} {m:.2f} GB peak" for p, m in mems)


def _num(v: float | None, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if unit == "tokens/s" or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def table(records: list[dict[str, Any]], env: Env) -> str:
    """Markdown: a header with the device and ceilings, one row per case, then the skip reasons."""
    lines = [
        f"# Benchmark summary: {env.gpu}",
        "",
        f"- device {env.device}, {'quick' if env.quick else 'full'} grid; versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(env.versions.items())),
        f"- measured ceilings: copy {_num(env.copy_gbps)} GB/s (read + write), bf16 matmul "
        f"{_num(env.matmul_tflops)} TFLOP/s",
    ]
    if not env.is_cuda:
        lines.append("- CPU run: tiny shapes through the PyTorch path. These numbers test the "
                     "harness; they are not speeds. The ceilings above are not this CPU's limits either "
                     "(a cache-sized copy, a small matmul), so the % ceiling column stays empty.")
    lines += ["", "| family | op | mode | dtype | shape | unit | ours | % ceiling | best other | its value "
              "| ours / best | notes |", "|---|---|---|---|---|---|---:|---:|---|---:|---:|---|"]
    for row in summarize(records):
        unit = UNITS.get(row["metric"], row["metric"] or "")
        ours = _num(row["ours"], unit) if row["ours_status"] == "ok" else row["ours_status"]
        best = (row["best"] or "-") + (" (disagrees)" if row["best_disagrees"] else "")
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        pct = _num(row["ours_pct"]) if env.is_cuda else ""       # no meaningful ceiling on a CPU
        lines.append(f"| {row['family']} | {row['op']} | {row['mode']} | {row['dtype']} | {row['label']} | {unit} "
                     f"| {ours} | {pct} | {best} | {_num(row['best_value'], unit)} | {ratio} "
                     f"| {row['notes']} |")
    skipped: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        if r["status"] in ("skipped", "error"):
            skipped[f"{r['family']}/{r['provider']}"][f"{r['status']}: {r['reason']}"] += 1
    if skipped:
        lines += ["", "Not measured (provider: reason, count):", ""]
        for prov in sorted(skipped):
            for reason, n in sorted(skipped[prov].items(), key=lambda kv: -kv[1]):
                lines.append(f"- {prov}: {reason} ({n})")
    disagree = [r for r in records if r.get("agrees_with_ours") is False]
    if disagree:
        lines += ["", "Outputs that disagree with ours (relative L2 error):", ""]
        lines += [f"- {r['family']} {r['op']} {r['mode']} {r['label']} {r['provider']}: {r['rel_err_vs_ours']:.2e}"
                  for r in disagree]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _ok(records: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]


def _lines(ax, recs: list[dict[str, Any]], x: str, metric: str) -> None:
    by_provider: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in recs:
        by_provider[r["provider"]].append((r["shape"][x], r[metric]))
    for prov, pts in sorted(by_provider.items(), key=lambda kv: kv[0] != "ours"):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov,
                linewidth=2.5 if prov == "ours" else 1.2)
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)


def _panels(n: int, cols: int, size: tuple[float, float] = (4.2, 3.2)):
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(n / cols))
    cols = min(cols, n) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def _finish(fig, axes, path: str, title: str) -> str:
    handles, labels = {}, {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
            labels[lab] = lab
    if handles:
        fig.legend(list(handles.values()), list(labels), loc="upper center", ncol=min(8, len(handles)),
                   bbox_to_anchor=(0.5, 1.0), fontsize=8)
    fig.suptitle(title, y=1.04, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def _plot_attention(records, env: Env, out: str) -> str | None:
    recs = _ok(records, family="attention", grid="standard")
    if not recs:
        return None
    panels = sorted({(r["dtype"], r["mode"], r["shape"]["D"], r["shape"]["causal"]) for r in recs},
                    key=lambda p: (p[0], p[1] != "fwd", p[2], p[3]))
    fig, axes = _panels(len(panels), 4 if len(panels) >= 4 else len(panels))
    for ax, (dtype, mode, d, causal) in zip(axes, panels):
        _lines(ax, [r for r in recs if (r["dtype"], r["mode"], r["shape"]["D"], r["shape"]["causal"])
                    == (dtype, mode, d, causal)], "L", "tflops")
        if env.matmul_tflops > 0:
            ax.axhline(env.matmul_tflops, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(f"{dtype} {mode} D={d}{' causal' if causal else ''}", fontsize=9)
        ax.set_xlabel("sequence length (batch x seq = 16k tokens)" if env.is_cuda else "sequence length")
        ax.set_ylabel("TFLOP/s")
    return _finish(fig, axes, os.path.join(out, "attention.png"),
                   f"Attention TFLOP/s on {env.gpu} (dashed: measured bf16 matmul "
                   f"{_num(env.matmul_tflops)} TFLOP/s)" + ("  [CPU: harness test, not speeds]" if not env.is_cuda
                                                              else ""))


def _bars(ax, recs: list[dict[str, Any]], metric: str) -> None:
    cases = sorted({(r["op"], r["grid"], r["mode"], r["label"]) for r in recs})
    providers = sorted({r["provider"] for r in recs}, key=lambda p: (p != "ours", p))
    width = 0.8 / max(1, len(providers))
    for i, prov in enumerate(providers):
        vals = []
        for c in cases:
            r = next((r for r in recs if (r["op"], r["grid"], r["mode"], r["label"]) == c and r["provider"] == prov),
                     None)
            vals.append(r[metric] if r else 0.0)
        ax.bar([j + i * width for j in range(len(cases))], vals, width, label=prov)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{c[1]} {c[2]}\n{c[3]}" for c in cases], fontsize=6, rotation=30, ha="right")
    ax.grid(alpha=0.3, axis="y")


def _plot_attention_other(records, env: Env, out: str) -> str | None:
    shapes = [r for r in _ok(records, family="attention") if r["grid"] in ("bert", "vit")]
    decode = _ok(records, family="attention", grid="decode")
    batches = sorted({r["shape"]["B"] for r in decode})
    n = (1 if shapes else 0) + len(batches)
    if n == 0:
        return None
    fig, axes = _panels(n, 3)
    i = 0
    if shapes:
        _bars(axes[0], shapes, "tflops")
        axes[0].set_title("BERT (padded) and ViT shapes", fontsize=9)
        axes[0].set_ylabel("TFLOP/s")
        i = 1
    for ax, b in zip(axes[i:], batches):
        _lines(ax, [r for r in decode if r["shape"]["B"] == b], "S", "gbps")
        if env.copy_gbps > 0:
            ax.axhline(env.copy_gbps, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(f"decoding, batch {b}, 1 query", fontsize=9)
        ax.set_xlabel("KV cache length")
        ax.set_ylabel("GB/s of KV cache read")
    return _finish(fig, axes, os.path.join(out, "attention_shapes.png"),
                   f"Attention: model shapes and decoding on {env.gpu} (dashed: measured copy bandwidth)")


def _plot_norms(records, env: Env, out: str) -> str | None:
    recs = [r for r in records if r["family"] in ("norm", "softmax") and r["status"] == "ok"]
    if not recs:
        return None
    panels = sorted({(r["op"], r["mode"]) for r in recs}, key=lambda p: (p[0], p[1] != "fwd"))
    fig, axes = _panels(len(panels), 4)
    for ax, (op, mode) in zip(axes, panels):
        _lines(ax, [r for r in recs if (r["op"], r["mode"]) == (op, mode)], "N", "gbps")
        if env.copy_gbps > 0:
            ax.axhline(env.copy_gbps, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(f"{op} {mode}", fontsize=9)
        ax.set_xlabel("row length N")
        ax.set_ylabel("GB/s")
    return _finish(fig, axes, os.path.join(out, "norms.png"),
                   f"Norms and softmax, bf16, on {env.gpu} (dashed: measured copy {_num(env.copy_gbps)} GB/s)")


def _plot_models(records, env: Env, out: str) -> str | None:
    recs = _ok(records, family="model")
    if not recs:
        return None
    models = sorted({r["op"] for r in recs})
    fig, axes = _panels(len(models), 3)
    for ax, m in zip(axes, models):
        _bars(ax, [r for r in recs if r["op"] == m], "tokens_per_s")
        ax.set_title(m, fontsize=9)
        ax.set_ylabel("tokens/s")
    return _finish(fig, axes, os.path.join(out, "models.png"), f"Models on {env.gpu}")


def plots(records: list[dict[str, Any]], env: Env, out: str) -> list[str]:
    """Write the PNGs that have data; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on the GPU machine or in CI
    written = []
    for fn in (_plot_attention, _plot_attention_other, _plot_norms, _plot_models):
        path = fn(records, env, out)
        if path:
            written.append(path)
    return written
