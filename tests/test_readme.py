"""The README's Python code blocks run as written.

Each block is pasted into a file in an empty folder outside the repository
and run in a fresh process on the backend of this test run, as a user would;
the block must exit 0 and print no warning or traceback.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def readme_blocks() -> list[str]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_the_readme_has_python_blocks():
    assert len(readme_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_block_runs_as_written(index, tmp_path):
    code = readme_blocks()[index]
    if "onnxruntime" in code or "export_onnx" in code:
        pytest.importorskip("onnxruntime", reason="ONNX export needs onnxruntime")
    script = tmp_path / f"block{index}.py"
    script.write_text(code)
    env = dict(os.environ)
    # The repository on the path as an installed package would be, and not
    # the current folder: the block runs from an empty temporary folder.
    env["PYTHONPATH"] = str(ROOT)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    noisy = [
        line
        for line in proc.stderr.splitlines()
        if "Traceback" in line or re.search(r"\w+Warning\b", line)
    ]
    assert not noisy, "\n".join(noisy)
