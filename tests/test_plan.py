"""A run is resolved once (`plan_run`), the modes are a registry, and the code keeps that shape:
the platform's defaults applied at one site, the mode compared by name in one file, a short
`train()` (docs/design.md section 2)."""

import ast
from pathlib import Path

import pytest

from molf_jax.train import MODES, TrainConfig, mode_of, plan_run, resolve_config
from molf_jax.train.config import ConfigError
from molf_jax.train.plan import unresolved_fields

PACKAGE = Path(__file__).resolve().parent.parent / "molf_jax"


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_resolving_leaves_nothing_open_and_changes_no_setting(mode, platform):
    given = TrainConfig(mode=mode)
    resolved = resolve_config(given, platform)
    assert unresolved_fields(given) != []
    assert unresolved_fields(resolved) == []
    assert resolve_config(resolved, platform) == resolved
    # The values the unresolved config stood for are the ones written out.
    assert (resolved.ranks, resolved.alphas, resolved.lora_learning_rate, resolved.routing_top_k,
            resolved.data_protocol, resolved.length_cap) == (
        given.ranks, given.alphas, given.lora_learning_rate, given.routing_top_k,
        given.data_protocol, given.length_cap)


def test_given_settings_survive_resolution():
    given = TrainConfig(mode="molf", lora_ranks=(4, 8), lora_alpha=(2.0,), top_k=2,
                        lora_lr=1e-3, remat="full", protocol="authors")
    resolved = resolve_config(given, "cpu")
    assert (resolved.lora_ranks, resolved.lora_alpha, resolved.top_k, resolved.lora_lr,
            resolved.remat, resolved.param_dtype, resolved.max_length) == (
        (4, 8), (2.0, 2.0), 2, 1e-3, "full", "float32", None)


def test_the_plan_checks_the_batch_against_the_mesh():
    plan = plan_run(TrainConfig(mode="lora", mesh="fsdp=2", batch_size=4), platform="cpu")
    assert (plan.mode, plan.primary, dict(plan.mesh.shape)["fsdp"]) == (MODES["lora"], True, 2)
    with pytest.raises(ConfigError, match="--batch-size 3 must divide"):
        plan_run(TrainConfig(mode="lora", mesh="fsdp=2", batch_size=3), platform="cpu")


def test_the_registry_says_what_each_mode_does():
    table = {name: (m.adapter, m.fft_expert, m.routes, m.gated) for name, m in MODES.items()}
    assert table == {
        "fft": ("none", True, False, False),
        "lora": ("lora", False, False, False),
        "molf": ("lora", True, True, False),
        "molfe": ("lora", False, True, False),
        "molf_gate": ("lora", True, True, True),
        "adalora": ("adalora", False, False, False),
    }
    assert mode_of(TrainConfig(mode="molfe")) is MODES["molfe"]
    with pytest.raises(ConfigError, match="unknown mode 'nope'"):
        mode_of("nope")


def _python_files():
    return sorted(PACKAGE.rglob("*.py"))


def _is_mode(node) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name == "mode"


def _is_mode_name(node) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in MODES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_mode_name(e) for e in node.elts)
    return False


def mode_name_comparisons(path: Path) -> list[int]:
    """Lines of ``path`` that compare a ``mode`` with a mode's name."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_mode(s) for s in sides) and any(_is_mode_name(s) for s in sides):
                lines.append(node.lineno)
    return lines


def test_the_mode_is_compared_by_name_only_in_the_registry():
    found = {str(p.relative_to(PACKAGE)): mode_name_comparisons(p) for p in _python_files()}
    assert {p: lines for p, lines in found.items() if lines and p != "train/modes.py"} == {}


def test_the_platform_defaults_are_applied_at_one_site():
    calls = [str(p.relative_to(PACKAGE)) for p in _python_files()
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None)
             == "with_platform_defaults"]
    assert calls == ["train/plan.py"]


def test_train_is_a_short_sequence():
    tree = ast.parse((PACKAGE / "train" / "loop.py").read_text())
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 60
