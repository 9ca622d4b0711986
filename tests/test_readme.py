"""The README's runnable examples run as written."""

import os
import re
import subprocess
import sys

import pytest

from conftest import needs_bnb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name: str) -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    found = re.search(r"<!-- example:" + re.escape(name) + r" -->\n```python\n(.*?)```", text,
                      re.S)
    assert found, f"README has no example {name!r}"
    return found.group(1)


@needs_bnb
def test_the_evolution_strategies_example_runs(tmp_path):
    script = tmp_path / "es_step.py"
    script.write_text(_example("es-step"))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "one batched generate:" in proc.stdout
