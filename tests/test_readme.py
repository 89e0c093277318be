"""The README's usage example runs as written."""
import pathlib
import re


def test_readme_usage_example_runs():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md#usage", "exec"), namespace)
    moe = namespace["moe"]
    assert moe.last_stats.tokens_per_expert.sum().item() == 8 * 128 * 8
