"""docs/custom_loops.md: every python block runs exactly as written and does what it says."""

import pathlib
import re

import jax
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "custom_loops.md"


def blocks():
    text = DOC.read_text()
    found = {}
    for section in ("linen", "NNX"):
        body = text.split(f"\n## {section}\n", 1)[1]
        found[section] = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    return found


def test_the_page_has_one_block_per_section():
    assert len(re.findall(r"```python\n", DOC.read_text())) == len(blocks()) == 2


@pytest.mark.parametrize("section", ["linen", "NNX"])
def test_example_runs_as_written_learns_freezes_and_routes(capsys, section):
    namespace = {"__name__": f"custom_loops_{section}"}
    exec(compile(blocks()[section], str(DOC), "exec"), namespace)
    out = capsys.readouterr().out
    losses = namespace["losses"]
    assert losses[-1] < 0.5 * losses[0], out
    wins = namespace["route"].win_counts
    assert wins.shape == (2, 3) and int(wins.sum()) == 2 * len(losses)  # top-1 per module
    assert "loss" in out and "wins" in out
    # The Adam moments are split over 'fsdp' like the params (no whole copy per device).
    state = (namespace["opt_state"] if section == "linen"
             else nnx.as_pure(namespace["optimizer"].opt_state))
    moments = [leaf for _, mu in optax.tree_utils.tree_get_all_with_path(state, "mu")
               for leaf in jax.tree.leaves(mu)]
    splittable = [m for m in moments if m.ndim and m.shape[0] % 4 == 0]
    assert splittable and all(m.sharding.spec == P("fsdp") for m in splittable)
