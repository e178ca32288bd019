"""README.md's Python examples run as written (each block alone, in a scratch directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import reset_accelerator_state

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = BLOCKS[index]
    try:
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme_example"})
    finally:
        reset_accelerator_state()
