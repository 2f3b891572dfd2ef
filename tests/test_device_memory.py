"""The command-line tools let JAX take most of the GPU: the allocator's memory fraction is in
the environment before a command starts, unless the user chose one, and the first line says so."""

import os

import pytest

import molf_jax.cli.eval
import molf_jax.cli.export
import molf_jax.cli.train
from molf_jax.cli import main as cli_main
from molf_jax.device_memory import MEMORY_FRACTION_VARIABLE

COMMANDS = {"train": molf_jax.cli.train, "eval": molf_jax.cli.eval,
            "export": molf_jax.cli.export}


def _environment_seen_by(command, argv, monkeypatch):
    """Runs ``molf-jax argv`` with the command's body replaced by one that records the
    memory fraction in its environment."""
    seen = []
    monkeypatch.setattr(COMMANDS[command], "main",
                        lambda args: seen.append(os.environ.get(MEMORY_FRACTION_VARIABLE)) or 0)
    assert cli_main(argv) == 0
    return seen


ARGV = {"train": ["train"], "eval": ["eval", "--model", "m"], "export": ["export", "runs/x"]}


@pytest.mark.parametrize("command", sorted(ARGV))
def test_a_command_starts_with_jax_allowed_95_percent_of_the_gpu(command, monkeypatch, capsys):
    monkeypatch.delenv(MEMORY_FRACTION_VARIABLE, raising=False)
    assert _environment_seen_by(command, ARGV[command], monkeypatch) == ["0.95"]
    first_line = capsys.readouterr().err.splitlines()[0]
    assert first_line == (f"molf-jax {command}: device memory: JAX may take 0.95 of each GPU "
                          f"({MEMORY_FRACTION_VARIABLE}, set by molf_jax; set it yourself to "
                          "change it)")


def test_a_fraction_the_user_set_is_kept_and_named_as_theirs(monkeypatch, capsys):
    monkeypatch.setenv(MEMORY_FRACTION_VARIABLE, "0.5")
    assert _environment_seen_by("train", ARGV["train"], monkeypatch) == ["0.5"]
    assert "JAX may take 0.5 of each GPU (XLA_PYTHON_CLIENT_MEM_FRACTION, yours)" in \
        capsys.readouterr().err.splitlines()[0]


def test_plot_touches_no_device_and_leaves_the_variable_alone(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(MEMORY_FRACTION_VARIABLE, raising=False)
    cli_main(["plot", str(tmp_path / "missing")])
    assert MEMORY_FRACTION_VARIABLE not in os.environ
