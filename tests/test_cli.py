"""The console command."""

import subprocess
import sys

import pytest

from conftest import needs_bnb
from tinylora_kernels.cli import main, run_check


@needs_bnb
def test_check_runs_every_path_and_passes(capsys):
    assert main(["check", "--rows", "16"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "0 failed" in out and "FAIL" not in out


def test_check_says_once_what_a_path_it_cannot_run_needs(monkeypatch, capsys):
    from tinylora_kernels import ops

    monkeypatch.setattr(ops, "interpreting", lambda: False)
    assert main(["check", "--rows", "8", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    assert out.count("TRITON_INTERPRET=1") == 1 and "not run here: the triton path" in out
    rows = [line for line in out.splitlines() if line.startswith("qwen2")]
    assert rows and all(" reference " in line and line.rstrip().endswith("ok") for line in rows)


def _break_the_adapter(monkeypatch, scale=1.01):
    """A deliberately wrong torch path: the adapter added onto a base 1 % off."""
    from tinylora_kernels import layers

    real = layers.add_adapter_inference
    monkeypatch.setattr(layers, "add_adapter_inference",
                        lambda base, *args: real(base * scale, *args))


@needs_bnb
def test_check_results_are_computed(monkeypatch):
    _break_the_adapter(monkeypatch)
    results = run_check(rows=8, dtypes=("fp32",))
    failed = [r for r in results if r["status"] == "FAIL"]
    assert failed and all(r["path"] == "reference" for r in failed)
    assert all(r["max_err"] > r["budget"] for r in failed)


@needs_bnb
def test_check_exits_1_and_shows_the_failing_path(monkeypatch, capsys):
    _break_the_adapter(monkeypatch)
    assert main(["check", "--rows", "8", "--dtypes", "fp32"]) == 1
    out = capsys.readouterr().out
    fail_rows = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    assert fail_rows and all("reference" in line for line in fail_rows)


def test_module_entry_point_inspect_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "tinylora_kernels", "inspect", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not a torch checkpoint" in proc.stderr

