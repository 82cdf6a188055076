"""The README's example runs as written, from the repository root."""

import os
import re

from conftest import ROOT, require_shared


def test_readme_example_runs(monkeypatch):
    require_shared()
    text = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(example.strip().splitlines()) == 5
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["logits"].shape == (1, 5, 512)
    assert os.getcwd() == str(ROOT)
