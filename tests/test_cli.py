"""The console command."""

import subprocess
import sys

import pytest

from conftest import needs_bnb
from tinylora_kernels.cli import format_table, main, run_check


@needs_bnb
def test_check_runs_every_path_and_passes(capsys):
    assert main(["check", "--rows", "16"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "0 failed" in out and "FAIL" not in out


def test_check_reports_a_failing_path():
    rows = [{"model": "m", "projection": "full", "path": "reference", "dtype": "fp32",
             "layers": 1, "max_err": 1.0, "budget": 0.5, "status": "FAIL"}]
    assert "FAIL" in format_table(rows)


def test_check_results_are_computed(monkeypatch):
    # a deliberately wrong forward must be caught by the check
    from tinylora_kernels import layers

    real = layers.add_adapter
    monkeypatch.setattr(layers, "add_adapter", lambda base, x, f, d: real(base * 1.01, x, f, d))
    results = run_check(rows=8, dtypes=("fp32",))
    assert any(r["status"] == "FAIL" for r in results)


def test_module_entry_point_inspect_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "tinylora_kernels", "inspect", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not a loadable" in proc.stderr


def test_unknown_dtype_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["check", "--dtypes", "fp8"])
