"""The README's "Routing any pytree" example runs as written and does what it says."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_block(section):
    text = README.read_text()
    body = text.split(f"## {section}", 1)[1]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_routing_any_pytree_example_runs_and_learns(capsys):
    namespace = {}
    exec(compile(readme_block("Routing any pytree"), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert float(namespace["loss"]) < 0.5 * float(namespace["first_loss"]), out
    wins = np.asarray(namespace["route_state"].win_counts[0])
    assert wins.sum() == namespace["steps"]  # one winner per step (top-1)
    assert "wins per expert" in out


def test_the_custom_score_example_is_the_shipped_file():
    shipped = (README.parent / "molf_jax" / "experiments" / "scores.py").read_text()
    assert readme_block("Your own routing score") == shipped
