"""The README's usage example runs as written (a stale example is the first thing a user meets)."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        scope = {}
        exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - our own documentation
    assert isinstance(scope.get("loss"), torch.Tensor) and scope["loss"].dim() == 0
