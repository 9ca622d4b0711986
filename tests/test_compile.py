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
