"""The README's Python examples run as written: every ```python block is executed, in order, in one
namespace per block, in a temporary working directory. (Shell examples are not run here; the
commands they use are tested by the command-line tests.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import moh

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {reg: set(reg.names()) for reg in (moh.BACKENDS, moh.ROUTERS)}
    try:
        exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    finally:  # what a block registered does not leak into other tests
        for reg, names in before.items():
            for name in set(reg.names()) - names:
                reg.unregister(name)
