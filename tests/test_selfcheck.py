"""``python -m fused_kernels``: the self-check table's columns line up for every case name, on passes, failures
and crashes (the cases themselves are run by the op tests; here ``run_case`` is replaced)."""

import importlib

import pytest

from fused_kernels._core import backend as _backend
from fused_kernels.selfcheck import CASES

main_mod = importlib.import_module("fused_kernels.__main__")


def test_table_columns_line_up(monkeypatch, capsys):
    if not _backend.INTERPRET:
        pytest.skip("main() re-executes itself without the interpreter")
    outcomes = iter([(1e-7, 1e-4), (2e-3, 1e-4)] + [(3.5e-6, 1e-4)] * (len(CASES) - 3) + [RuntimeError("boom")])

    def fake(case, device):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(main_mod, "run_case", fake)
    monkeypatch.setattr(main_mod.sys, "argv", ["python -m fused_kernels"])
    assert main_mod.main() == 1
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op "))
    header, rule, rows = lines[start], lines[start + 1], lines[start + 2:start + 2 + len(CASES)]
    assert set(rule) == {"-"} and len(rule) == len(header)
    assert [r[:len(name)] for r, (name, _) in zip(rows, CASES)] == [name for name, _ in CASES]
    for column in ("max err", "tol", "time"):          # right-aligned: every row's field ends where the header's does
        end = header.index(column) + len(column)
        assert all(r[end - 1] != " " and (len(r) == end or r[end] == " ") for r in rows), column
    result = header.index("result")
    assert [r[result:result + 4] for r in rows] == ["PASS", "FAIL"] + ["PASS"] * (len(CASES) - 3) + ["FAIL"]
    assert rows[-1].endswith("RuntimeError: boom")
    assert lines[-1] == f"{len(CASES) - 2} passed, 2 failed"
    assert max(len(name) for name, _ in CASES) > 44   # the case name that broke the old fixed width


def test_help_prints_usage_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(main_mod.sys, "argv", ["python -m fused_kernels", "--help"])
    monkeypatch.setattr(main_mod, "run_case", lambda *a: pytest.fail("--help must not run the self-check"))
    monkeypatch.setattr(main_mod.os, "execv", lambda *a: pytest.fail("--help must not re-execute"))
    with pytest.raises(SystemExit) as exit_:
        main_mod.main()
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: python -m fused_kernels") and "``" not in out
