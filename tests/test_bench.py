"""The benchmark suite's machinery: runs here, reports what ran and what could not, compares."""

import json

import pytest
import torch

from conftest import needs_bnb
from tinylora_kernels import bench
from tinylora_kernels.cli import main


def _data(med_a, lo_a, hi_a):
    return {"rows": [{"model": "m", "layer": "q_proj", "M": 1, "mode": "fwd",
                      "providers": {"fused": {"median_us": med_a, "p20_us": lo_a,
                                              "p80_us": hi_a}}}]}


@pytest.mark.parametrize("b, verdict", [((5.0, 4.5, 5.5), "faster"), ((20.0, 19.0, 21.0), "slower"),
                                        ((10.5, 9.0, 12.0), "noise")])
def test_compare_flags_only_changes_beyond_the_spread(b, verdict):
    table = bench.compare(_data(10.0, 9.5, 10.5), _data(*b))
    row = [line for line in table.splitlines() if "| fused |" in line][0]
    assert row.rstrip(" |").endswith(verdict)
    assert f"{b[0] / 10.0:.2f}" in row


def test_floor_is_the_larger_of_bytes_and_flops():
    ceilings = {"copy_GBps": 1000.0, "matmul_TFLOPs": 100.0}
    small = bench.Case("qwen2.5-coder-3b", "gate_proj", 1, "fwd")
    big = bench.Case("qwen2.5-coder-3b", "gate_proj", 4096, "fwd")
    n, k = bench.MODELS["qwen2.5-coder-3b"]["shapes"]["gate_proj"]
    bytes_us = (n * k * bench.NF4_BYTES_PER_WEIGHT + 2 * (n + k)) / 1e6
    assert bench.floor_us(small, ceilings) == pytest.approx(bytes_us)
    assert bench.floor_us(big, ceilings) == pytest.approx(2 * 4096 * n * k / 1e8)
    layer = bench.Case("qwen2.5-coder-3b", "decoder_layer", 1, "fwd+bwd")
    assert len(layer.linears()) == 7
    assert len(bench.Case("qwen2.5-7b", "stack3", 1, "fwd").linears()) == 21


@needs_bnb
def test_suite_runs_on_the_cpu_and_writes_its_report(tmp_path, capsys):
    # the kernels are timed on GPUs only (the interpreter is far too slow to time)
    assert main(["bench", "--m", "1,16", "--layers", "k_proj,decoder_layer", "--modes",
                 "fwd,bwd", "--providers", "materialized,peft_style,bnb_base,dense_bf16,"
                 "reference", "--budget-s", "60", "--out", str(tmp_path), "--name", "run"]) == 0
    out = capsys.readouterr().out
    assert "GPU figures need a GPU" in out
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["device"] == "cpu" and data["env"]["torch"] == torch.__version__
    assert {r["layer"] for r in data["rows"]} == {"k_proj", "decoder_layer"}
    for row in data["rows"]:
        for provider in ("materialized", "peft_style", "bnb_base", "dense_bf16", "reference"):
            stats = row["providers"][provider]
            assert stats["median_us"] > 0 and stats["p20_us"] <= stats["p80_us"]
            assert stats["time_over_floor"] == pytest.approx(stats["median_us"] / row["floor_us"])
    md = (tmp_path / "run.md").read_text()
    assert "decoder_layer" in md and "materialized µs" in md
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "run.png").stat().st_size > 0
    except ImportError:
        pass
    assert main(["bench", "--compare", str(tmp_path / "run.json"),
                 str(tmp_path / "run.json")]) == 0
    assert "noise" in capsys.readouterr().out


def test_bench_rejects_unknown_names(capsys):
    assert main(["bench", "--models", "gpt-5"]) == 2
    assert main(["bench", "--providers", "magic"]) == 2
    assert "unknown" in capsys.readouterr().err
