"""The README's usage example runs as written, on whatever device this machine has."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_usage_example_runs_as_written(capsys):
    pytest.importorskip("attention._C", reason="the example's default backend on a CPU is the C++ extension")
    example = re.search(r"## Usage\n\n```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    exec(compile(example, str(README), "exec"), {})
    assert "backend" in capsys.readouterr().out  # explain() says which backend ran
