"""README's quick start runs as written."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs():
    source = README.read_text().split("```python", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(source, "README.md quick start", "exec"), namespace)
    assert namespace["y"].shape == (8, 6, 14, 14)
    assert type(namespace["model"].conv1).__module__ == "tritonkit.nn"
