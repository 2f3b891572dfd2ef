"""The README's example and docs/routing.md's "Routing any pytree" run as written and do what
they say; the worked score of docs/routing.md is the shipped module."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ROUTING = ROOT / "docs" / "routing.md"


def readme_block(section, page=ROUTING):
    text = page.read_text()
    body = text.split(f"## {section}", 1)[1]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_the_readme_example_trains_with_the_routed_optimizer(capsys):
    exec(compile(readme_block("In your own training loop", README), "README.md", "exec"), {})
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)",
                                       capsys.readouterr().out).groups())
    assert last < 0.5 * first


def test_routing_any_pytree_example_runs_and_learns(capsys):
    namespace = {}
    exec(compile(readme_block("Routing any pytree"), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert float(namespace["loss"]) < 0.5 * float(namespace["first_loss"]), out
    wins = np.asarray(namespace["route_state"].win_counts[0])
    assert wins.sum() == namespace["steps"]  # one winner per step (top-1)
    assert "wins per expert" in out


def test_the_custom_score_example_is_the_shipped_file():
    shipped = (ROOT / "molf_jax" / "experiments" / "scores.py").read_text()
    assert readme_block("Your own routing score") == shipped
