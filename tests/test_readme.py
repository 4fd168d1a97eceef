"""The README's Python example runs as written (on a tiny checkpoint, CPU, its default size)."""

import pathlib
import re

from lingbot_ray.models.tiny import build_tiny_checkpoint

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    folder = build_tiny_checkpoint(tmp_path / "tiny")
    code = (
        block.replace('"/models/lingbot-world-fast-diffusers"', repr(str(folder)))
        .replace('device="cuda"', 'device="cpu"')
        .replace("(480, 832, 3)", "(96, 160, 3)")
        .replace("width=832, height=480", "width=160, height=96")
    )
    assert code != block
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert [c.shape for c in namespace["chunks"]] == [(9, 96, 160, 3), (12, 96, 160, 3)]
