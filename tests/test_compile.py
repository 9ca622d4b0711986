"""The compile tier's quick form: every kernel family, compiled for Hopper by the real Triton
compiler in a fresh process (no GPU needed; the interpreter cannot see compile errors). The full
matrix, and sm_80/sm_100, run in CI (`.ci/run`) through the same command."""

import os
import subprocess
import sys

import pytest

from conftest import HAS_TRITON


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_every_kernel_family_compiles_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tinylora_kernels.compile_check", "--matrix",
                           "quick", "--targets", "sm_90", "--jobs", "2"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failed" in proc.stdout


def test_compile_check_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", "import sys; from tinylora_kernels import "
                           "compile_check; sys.exit(compile_check.main(['--matrix', 'quick']))"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr


def _compiled_facts(script: str, tmp_path):
    """The JSON a compile script prints last, run in a fresh process without the interpreter
    (the real compiler, for sm_90)."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_PIPELINED = r'''
import json, torch
from tinylora_kernels.compile_check import capture, compile_all, random_nf4, _factors
from tinylora_kernels.ops.configs import pick_config
from tinylora_kernels.ops.custom_ops import kernel_forward, kernel_grad_x
from tinylora_kernels.static_report import sass_stats
gen = torch.Generator().manual_seed(0)
w, f = random_nf4(256, 256, True, gen=gen), _factors(256, 256, 2, gen)
with capture("sm_90") as cap:
    kernel_forward("fused", torch.randn(16, 256).bfloat16(), w, None, f,
                   out_dtype=torch.bfloat16, config=pick_config(16, 256, 256))
    kernel_grad_x("fused", torch.randn(16, 256).bfloat16(), w, f, x_dtype=torch.bfloat16)
out = []
for c in compile_all(cap.launches, "sm_90", 1):
    loop = sass_stats(c.cubin)["k_loop"]
    out.append([c.launch.kernel, loop["nested_loops"], loop["async_copies"]])
print(json.dumps(out))
'''


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_the_adapter_keeps_the_main_loop_software_pipelined(tmp_path):
    """With the adapter compiled in, the forward's K loop and grad_x's N loop hold no inner
    loop (the rank loop is unrolled) and load the weight by async copies, as without it: a
    runtime-rank loop inside made Triton load every tile synchronously."""
    loops = _compiled_facts(_PIPELINED, tmp_path)
    assert sorted(k for k, _, _ in loops) == ["_fused_linear_kernel", "_grad_x_kernel"]
    for kernel, nested, async_copies in loops:
        assert nested == 0 and async_copies > 0, (kernel, nested, async_copies)


_GEMV_LOOP = r'''
import json, torch
from tinylora_kernels.compile_check import capture, compile_all, random_nf4, _factors
from tinylora_kernels.ops.configs import gemv_config, pick_config
from tinylora_kernels.ops.custom_ops import kernel_forward, kernel_grad_x
from tinylora_kernels.static_report import sass_stats
gen = torch.Generator().manual_seed(0)
w, f = random_nf4(512, 2048, True, gen=gen), _factors(512, 2048, 2, gen)
out = {}
for name, factors in (("adapter", f), ("bare", None)):
    with capture("sm_90") as cap:
        kernel_grad_x("fused", torch.randn(16, 512).bfloat16(), w, factors,
                      x_dtype=torch.bfloat16)
    for c in compile_all(cap.launches, "sm_90", 1):
        loop = sass_stats(c.cubin)["k_loop"]
        out[f"grad_x:{name}:16"] = [loop["barriers"], loop["shuffles"], loop["shared_accesses"]]
for path, m in (("gemv", 1), ("gemv", 4), ("fused", 16)):
    cfg = gemv_config(512, 2048) if path == "gemv" else pick_config(m, 512, 2048)
    for name, factors in (("adapter", f), ("bare", None)):
        with capture("sm_90") as cap:
            kernel_forward(path, torch.randn(m, 2048).bfloat16(), w, None, factors,
                           out_dtype=torch.bfloat16, config=cfg)
        for c in compile_all(cap.launches, "sm_90", 1):
            loop = sass_stats(c.cubin)["k_loop"]
            out[f"{path}:{name}:{m}"] = [loop["barriers"], loop["shuffles"],
                                         loop["shared_accesses"]]
print(json.dumps(out))
'''


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_the_weight_loop_holds_nothing_of_the_adapter(tmp_path):
    """The GEMV's weight loop, and at 16-row tiles the fused kernel's K loop and grad_x's N loop,
    synchronize their threads no more with the adapter than without: A x is accumulated per
    element in a loop of its own after the weight loop and reduced once (a block-wide sum per step and row of x
    inside it made every step wait on barriers and shuffles)."""
    loops = _compiled_facts(_GEMV_LOOP, tmp_path)
    for key in ("gemv:{}:1", "gemv:{}:4", "fused:{}:16", "grad_x:{}:16"):
        assert loops[key.format("adapter")] == loops[key.format("bare")], loops
