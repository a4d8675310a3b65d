"""The benchmark harness runs end to end (on the CPU: tiny shapes, reference or interpreted kernels)."""

import json

from bench import memory_bound


def test_memory_bound_harness_writes_records(tmp_path):
    records = memory_bound.main(["--out", str(tmp_path), "--dtype", "fp32"])
    saved = json.loads((tmp_path / "memory_bound.json").read_text())
    assert saved == records
    ops = {(r["op"], r["provider"]) for r in records}
    for op in ("layer_norm fwd", "layer_norm fwd+bwd", "add_layer_norm fwd", "softmax fwd", "softmax fwd+bwd"):
        assert {(op, "ours"), (op, "torch")} <= ops
    assert all(r["ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0 for r in records)
