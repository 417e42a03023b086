"""The README's quick start runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_builds_the_model_it_shows():
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    outputs = namespace["model"].output
    assert outputs["logits"].shape == (None, 200)
    assert outputs["parts"].shape == (None, 7, 7, 4)
    assert outputs["where"].shape == (None, 7, 7)
