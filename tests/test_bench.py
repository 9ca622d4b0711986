"""The benchmark suite's machinery: runs here, reports what ran and what could not, compares."""

import json

import pytest
import torch

from conftest import needs_bnb
from tinylora_kernels import bench
from tinylora_kernels.cli import main


def _data(med_a, lo_a, hi_a):
    # the first result format (suite rows with the case's keys at the top): still compared
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



def _compiled_first_format(projected_us):
    # the first --compiled report: scenarios with per-launch detail, no rows
    return {"what": "PROJECTED", "hardware_model": {"bytes_per_s": 4.8e12}, "triton": "3.6.0",
            "torch": "2", "scenarios": {"decode:1": {"launches": [], "projected_us": projected_us,
                                                     "byte_floor_us": 8.0}}}


@pytest.mark.parametrize("b_us, verdict", [(20.05, "same"), (10.0, "faster"), (30.0, "slower")])
def test_compiled_reports_of_either_format_compare(b_us, verdict):
    # projections have no spread: within 1 % they are the same, beyond it a change
    old = _compiled_first_format(20.0)
    new = bench.report.compiled_result("PROJECTED", old["hardware_model"],
                                       _compiled_first_format(b_us)["scenarios"], "3.6.0", "2")
    assert bench.report.upgrade(old)["rows"][0]["floor_us"] == 8.0
    row = [line for line in bench.compare(old, new).splitlines() if "projected_sm90" in line][0]
    assert row.rstrip(" |").endswith(verdict), row


@needs_bnb
def test_floor_counts_the_bytes_bitsandbytes_stores():
    # the byte floor must match what a real double-quantized NF4 weight occupies, counted from
    # bitsandbytes' own tensors (not from the formula under test)
    import bitsandbytes.functional as bnbF

    n, k = 512, 1024
    packed, qs = bnbF.quantize_4bit(torch.randn(n, k), quant_type="nf4", compress_statistics=True)
    stored = sum(t.numel() * t.element_size()
                 for t in (packed, qs.absmax, qs.state2.absmax))
    ceilings = {"copy_GBps": 1000.0, "matmul_TFLOPs": 1e9}       # bandwidth-bound
    bench.MODELS["_t"] = {"layers": 1, "shapes": {"lin": (n, k)}}
    try:
        floor = bench.floor_us(bench.Case("_t", "lin", 1, "fwd"), ceilings)
        activations = 2 * (n + k)                                 # x in, y out, 16-bit
        assert floor * 1e3 * 1000.0 == pytest.approx(stored + activations, rel=1e-3)
        both = bench.floor_us(bench.Case("_t", "lin", 1, "fwd+bwd"), ceilings)
        assert both == pytest.approx(2 * floor)
        # compute-bound when the matmul rate is the limit: time = FLOPs / rate, growing with M
        slow = {"copy_GBps": 1e9, "matmul_TFLOPs": 1.0}
        t1, t2 = (bench.floor_us(bench.Case("_t", "lin", m, "fwd"), slow) for m in (64, 128))
        assert t2 == pytest.approx(2 * t1)
    finally:
        del bench.MODELS["_t"]


def test_case_linears():
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
    assert data["schema"] == bench.SCHEMA and data["mode"] == "suite"
    assert data["device"] == "cpu" and data["env"]["torch"] == torch.__version__
    assert data["timing"]["clock"] == "wall" and data["timing"]["interleaved"] is True
    assert {r["case"]["layer"] for r in data["rows"]} == {"k_proj", "decoder_layer"}
    measured = 0
    for row in data["rows"]:
        for provider in ("materialized", "peft_style", "bnb_base", "dense_bf16", "reference"):
            stats = row["providers"][provider]
            if stats == {"not_run": "time budget spent"}:   # a loaded machine: said, not lost
                continue
            measured += 1
            assert stats["median_us"] > 0 and stats["p20_us"] <= stats["p80_us"]
            assert stats["time_over_floor"] == pytest.approx(stats["median_us"] / row["floor_us"])
    assert measured >= 5                # at least the first case, every contender
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


@pytest.mark.parametrize("argv, says", [
    (["bench", "--models", "gpt-5"], "unknown model 'gpt-5'; choose from qwen2.5-coder-3b"),
    (["bench", "--providers", "magic"], "unknown provider 'magic'; choose from materialized"),
    (["bench", "--layers", "nope"], "unknown layer 'nope'; choose from q_proj"),
    (["bench", "--layers", "stack0"], "unknown layer 'stack0'"),
    (["bench", "--modes", "sideways"], "unknown mode 'sideways'; choose from fwd, bwd, fwd+bwd"),
    (["bench", "--m", "abc"], "'abc': row counts are comma-separated whole numbers"),
    (["bench", "--m", "1,0"], "must be at least 1"),
    (["bench", "--compare", "missing.json", "missing2.json"], "missing.json: no such file"),
    (["check", "--rows", "0"], "must be at least 1, got 0"),
    (["check", "--rows", "-5"], "must be at least 1, got -5"),
    (["check", "--device", "tpu"], "unknown device 'tpu'; choose from cpu, cuda"),
    (["check", "--dtypes", "fp8"], "unknown dtype 'fp8'; choose from fp32, fp16, bf16"),
])
def test_bad_arguments_are_usage_errors_naming_the_valid_values(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["check", "--device", "cuda"])
    assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path, capsys):
    (tmp_path / "a.json").write_text("[1, 2]")
    (tmp_path / "b.txt").write_text("hello")
    for bad in ("a.json", "b.txt"):
        with pytest.raises(SystemExit):
            main(["bench", "--compare", str(tmp_path / bad), str(tmp_path / bad)])
    err = capsys.readouterr().err
    assert "not a result file" in err and "not a JSON result file" in err


def _result(mode, cases):
    rows = [{"case": {"layer": c}, "floor_us": None,
             "providers": {"p": {"median_us": 5.0, "p20_us": 4.0, "p80_us": 6.0}}} for c in cases]
    return bench.result(mode, "t", "cpu", {"clock": "wall"}, rows, env={})


def test_compare_refuses_results_that_share_nothing(tmp_path, capsys):
    for name, mode, cases in (("host", "host-cost", ["a"]), ("gen", "generate", ["a"]),
                              ("gen2", "generate", ["b"]), ("gen3", "generate", ["a"])):
        (tmp_path / f"{name}.json").write_text(json.dumps(_result(mode, cases)))
    path = lambda n: str(tmp_path / f"{n}.json")   # noqa: E731
    assert main(["bench", "--compare", path("host"), path("gen")]) == 2
    assert "same mode" in capsys.readouterr().err
    assert main(["bench", "--compare", path("gen"), path("gen2")]) == 1
    assert "no case measured in both" in capsys.readouterr().err
    assert main(["bench", "--compare", path("gen"), path("gen3")]) == 0
    assert "| a | p |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--compare", str(tmp_path), path("gen")])
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/tmp/x", ""])
def test_a_name_with_a_directory_is_refused(name, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--host-cost", "--out", str(tmp_path / "out"), "--name", name])
    assert "not a plain file name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@needs_bnb
def test_bench_writes_new_files_here_and_never_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--m", "1", "--layers", "k_proj", "--providers", "bnb_base,reference",
            "--budget-s", "5"]
    assert main(argv) == 0
    assert main(argv + ["--name", "same"]) == 0
    assert main(argv + ["--name", "same"]) == 0
    captured = capsys.readouterr()
    assert "tinylora bench" in captured.err                   # the progress bar
    stems = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert len(stems) == 3 and "same" in stems and "same-2" in stems
    assert stems[0].startswith("bench-cpu-")
    md = (tmp_path / "same.md").read_text()
    row = [line for line in md.splitlines() if line.startswith("| cpu-reduced | k_proj")][0]
    med, lo, hi = (float(v) for v in
                   __import__("re").search(r"\| ([\d.]+) \(([\d.]+)–([\d.]+)\) \|", row).groups())
    assert lo <= med <= hi


@needs_bnb
def test_host_cost_measures_both_cases(tmp_path):
    data = bench.host_cost(rounds=2, reps=5)
    assert data["schema"] == bench.SCHEMA and data["mode"] == "host-cost"
    assert data["timing"]["clock"] == "wall" and data["baseline"] == "bitsandbytes"
    calls = {(r["case"]["call"], r["case"]["path"]): r for r in data["rows"]}
    for call in ("no_grad", "fwd+bwd"):
        for path in ("reference", "reference_in_model_call"):
            row = calls[(call, path)]
            bare, ours = row["providers"]["bitsandbytes"], row["providers"]["tinylora"]
            assert bare["min_us"] > 0 and ours["min_us"] > 0
            assert row["ratio_min"] == pytest.approx(ours["min_us"] / bare["min_us"])
            assert ours["ops"] > bare["ops"] and len(ours["op_list"]) == ours["ops"]
            assert ours["plan"].startswith("torch")
    # inside a model call a no-grad call's adapter operands come from the call's batch
    ops = {path: calls[("no_grad", path)]["providers"]["tinylora"]["ops"]
           for path in ("reference", "reference_in_model_call")}
    assert ops["reference_in_model_call"] < ops["reference"]
    paths = bench.write(data, tmp_path, "h")
    assert "no_grad" in paths[1].read_text() and json.loads(paths[0].read_text())["rows"]


@needs_bnb
def test_profile_lists_every_operation_of_a_decoder_layer_call():
    from tinylora_kernels.bench.profile import profile_layer, profile_markdown

    data = profile_layer(device="cpu", ms=(1,), calls=2, progress=lambda s: None)
    assert data["schema"] == bench.SCHEMA and data["mode"] == "profile"
    rows = {(r["case"]["mode"], r["case"]["provider"]): r for r in data["rows"]}
    assert set(rows) == {(m, p) for m in ("fwd", "fwd+bwd") for p in ("reference", "bnb_base")}
    for r in rows.values():
        assert r["ops"] and r["total"]["host_us"] > 0
        assert r["total"]["host_us"] == pytest.approx(sum(o["host_us"] for o in r["ops"]))
    ours = {o["op"]: o["per_call"] for o in rows[("fwd", "reference")]["ops"]}
    bare = {o["op"]: o["per_call"] for o in rows[("fwd", "bnb_base")]["ops"]}
    assert all(n > 0 for n in (*ours.values(), *bare.values()))
    assert sum(ours.values()) > sum(bare.values())        # the adapter's operations
    text = profile_markdown(data)
    assert "M = 1, fwd+bwd, reference" in text and "| operation |" in text


@needs_bnb
def test_gemv_sweep_machinery_runs_under_the_interpreter():
    from conftest import KERNELS_RUN

    if not KERNELS_RUN or torch.cuda.is_available():
        pytest.skip("the CPU check of the sweep needs the interpreter (on a GPU it is a benchmark)")
    data = bench.gemv_sweep(model="cpu-reduced", ms=(1,), bns=(16,), bkhs=(32,), splits=(1, 2),
                            warps=(1,), layers=["k_proj"], device="cpu")
    assert data["schema"] == bench.SCHEMA and data["mode"] == "gemv-sweep"
    # 2 splits, and the default shape (split 1 here) with the prefetch
    assert {(r["case"]["split"], r["case"]["prefetch"]) for r in data["rows"]} == {
        (1, False), (1, True), (2, False)} and len(data["rows"]) == 3
    assert all(r["providers"]["nf4_gemv"]["median_us"] > 0 for r in data["rows"])
    (best,) = data["best"]
    assert best["layer"] == "k_proj" and best["time_over_floor"] > 0


# -- one harness: every mode, one format ------------------------------------------------------
class _OpClock:
    """A deterministic clock for the suite's plumbing: one ms per aten operation run (counted by
    a dispatch mode), so a forward, a backward and the two together cost exactly their
    operations, whatever else loads the machine."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        clock = self

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                clock.ops += 1
                return func(*args, **(kwargs or {}))

        self.ops = 0
        self.mode = Count()

    def perf_counter(self):
        return self.ops * 1e-3


@needs_bnb
def test_the_suite_pairs_fwd_and_bwd_measured_apart_with_fwd_bwd_together(monkeypatch):
    # the same harness and cases: with a clock that charges each operation once, the forward
    # (as fwd+bwd runs it) plus the backward, each measured on its own, add up to the two
    # measured together, for every provider whose operations torch runs (timing on a real clock
    # is the benchmark's to report, not a unit test's to assert)
    import types

    import tinylora_kernels.bench.timing as timing

    clock = _OpClock()
    fake_time = types.SimpleNamespace(perf_counter=clock.perf_counter)
    monkeypatch.setattr(timing, "time", fake_time)
    cases = bench.default_cases("cpu", ms=[8], modes=("fwd", "bwd", "fwd+bwd"),
                                layers=["decoder_layer"])
    providers = [p for p in ("reference", "bnb_base")
                 if bench.provider_missing(p, "cpu") is None]
    with clock.mode:
        data = bench.run_suite(cases, providers, device="cpu", budget_s=300, progress=False)
    checks = bench.consistency(data)
    assert {c["provider"] for c in checks} == set(providers)
    for c in checks:
        assert c["fwd_grad_enabled"] and c["bwd_us"] > 0 and c["fwd_us"] > 0
        assert c["ratio"] == pytest.approx(1.0, abs=0.02), c
    assert "Consistency" in bench.markdown(data)


def test_consistency_flags_a_backward_measured_apart_from_the_suite():
    # a bwd that is not the backward of this forward (the old per-script contradiction) shows
    def row(mode, us):
        return {"case": {"model": "m", "layer": "l", "M": 1, "mode": mode}, "floor_us": None,
                "providers": {"p": {"median_us": us, "p20_us": us, "p80_us": us}}}
    data = bench.result("suite", "t", "cpu", {"clock": "wall"},
                        [row("fwd", 10.0), row("bwd", 2.0), row("fwd+bwd", 30.0)], env={})
    (c,) = bench.consistency(data)
    assert c["ratio"] == pytest.approx(0.4) and "(outside)" in bench.markdown(data)


@needs_bnb
def test_parts_and_setup_modes_write_the_one_format(tmp_path, capsys):
    assert main(["bench", "--parts", "--layers", "k_proj", "--m", "16", "--out", str(tmp_path),
                 "--name", "parts"]) == 0
    data = json.loads((tmp_path / "parts.json").read_text())
    assert data["schema"] == bench.SCHEMA and data["mode"] == "parts"
    (row,) = data["rows"]
    assert row["case"]["layer"] == "k_proj" and row["case"]["M"] == 16
    assert row["providers"]["bnb"]["median_us"] > 0
    assert "GPU" in row["providers"]["decode_triton"]["not_run"]
    data = bench.setup_cost(model="cpu-reduced", n_layers=1)
    assert data["mode"] == "setup" and data["rows"][0]["case"]["linears"] == 7
    assert set(data["rows"][0]["providers"]) == {"no_cache", "cold_cache", "warm_cache"}
    # any two results of one mode compare
    bench.write(data, tmp_path, "setup")
    assert main(["bench", "--compare", str(tmp_path / "setup.json"),
                 str(tmp_path / "setup.json")]) == 0
    assert "warm_cache" in capsys.readouterr().out


def test_one_mode_at_a_time(capsys):
    assert main(["bench", "--parts", "--setup"]) == 2
    assert "one mode at a time" in capsys.readouterr().err


def test_benchmarks_folder_holds_only_the_suite_tests_the_gpu_job_and_results():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    assert sorted(p.name for p in root.iterdir() if p.name != "__pycache__") == \
        ["gpu_check.sh", "results", "test_suite.py"]
    job = (root / "gpu_check.sh").read_text()
    runs = [line for line in job.splitlines() if "python3 " in line and "-c" not in line
            and "pytest" not in line]
    assert runs and all("tinylora_kernels bench" in line for line in runs), runs


def test_a_cpu_run_says_reduced_shapes_only_when_it_used_them():
    from tinylora_kernels.bench.cases import cpu_note

    assert "reduced shapes" in cpu_note(["cpu-reduced", "qwen2.5-7b"])
    note = cpu_note(["qwen2.5-coder-3b"])
    assert "reduced" not in note and note.startswith("CPU run: CPU timings")
