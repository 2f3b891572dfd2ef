"""Routing-dynamics plots, rendered from small recorded run logs in fixtures/run_small/.

``molf/`` is a MoLF run (FFT + one LoRA rank), ``molfe/`` a MoLF-E run (two ranks, no FFT
expert): 2 layers x 7 projections, 10 logged routing steps, 5 metric lines each.
"""

import json
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.collections import QuadMesh

from molf_jax import cli
from molf_jax.viz import (fraction_figure, heatmap_figure, loss_figure, plot_run, read_run)

FIXTURES = Path(__file__).parent / "fixtures" / "run_small"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def raw_routing(run):
    """Winners [S, M, E] and module names straight from the fixture files."""
    table = json.loads((FIXTURES / run / "routing_modules.json").read_text())
    lines = (FIXTURES / run / "routing.jsonl").read_text().splitlines()
    return table, np.asarray([json.loads(line)["winners"] for line in lines])


@pytest.mark.parametrize("run,sizes", [
    ("molf", {"routing_fraction.png": (500, 1100), "routing_heatmap.png": (620, 1280),
              "loss.png": (500, 1000)}),
    ("molfe", {"routing_fraction.png": (1000, 1100), "routing_heatmap.png": (620, 1280),
               "loss.png": (500, 1000)}),
])
def test_plot_run_writes_pngs_of_the_expected_pixel_size(tmp_path, run, sizes):
    paths = plot_run(FIXTURES / run, tmp_path / "out")
    assert [p.name for p in paths] == list(sizes)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[:2] == sizes[path.name], path.name
        assert image[..., :3].std() > 0.05, f"{path.name} looks blank"


def test_plot_run_defaults_to_the_runs_plots_folder(tmp_path):
    run = shutil.copytree(FIXTURES / "molf", tmp_path / "run")
    assert plot_run(run)[0] == run / "plots" / "routing_fraction.png"


def test_molf_fraction_has_one_line_per_projection_and_one_over_all_modules():
    fig = fraction_figure(read_run(FIXTURES / "molf"))
    (ax,) = fig.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == [f"{p} (2)" for p in PROJECTIONS] + ["all (14)"]
    table, winners = raw_routing("molf")
    q_rows = [i for i, m in enumerate(table["modules"]) if m.endswith("q_proj")]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), winners[:, q_rows, 0].mean(1))
    np.testing.assert_allclose(ax.get_lines()[-1].get_ydata(), winners[:, :, 0].mean(1))
    assert "FFT" in ax.get_ylabel() and ax.get_xlabel() == "optimizer step"
    assert "molf, qwen2.5-0.5b" in fig.get_suptitle()


def test_molfe_fraction_has_a_panel_per_rank_and_they_add_up_to_one():
    fig = fraction_figure(read_run(FIXTURES / "molfe"))
    assert [ax.get_title() for ax in fig.axes] == [
        "Modules whose update came from the lora_1 (r=4) expert",
        "Modules whose update came from the lora_2 (r=16) expert"]
    assert [len(ax.get_lines()) for ax in fig.axes] == [8, 8]
    first, second = ([line.get_ydata() for line in ax.get_lines()] for ax in fig.axes)
    np.testing.assert_allclose(np.add(first, second), 1.0)  # top-1 between two ranks


@pytest.mark.parametrize("run,legend", [("molf", ["fft", "lora_1 (r=8)"]),
                                        ("molfe", ["lora_1 (r=4)", "lora_2 (r=16)"])])
def test_heatmap_has_a_layer_by_step_panel_per_projection_and_names_the_experts(run, legend):
    fig = heatmap_figure(read_run(FIXTURES / run))
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == PROJECTIONS
    assert [t.get_text() for t in fig.legends[0].get_texts()] == legend

    table, winners = raw_routing(run)
    shown = [e for e in range(len(table["experts"])) if any(r[e] for r in table["valid"])]
    for ax, kind in zip(panels, PROJECTIONS):
        (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
        cells = np.asarray(mesh.get_array()).reshape(2, 10)  # layers x logged steps
        for layer in range(2):
            row = table["modules"].index(next(m for m in table["modules"]
                                              if m.startswith(f"layers/{layer}/")
                                              and m.endswith(kind)))
            expected = [shown.index(int(np.argmax(w))) for w in winners[:, row]]
            np.testing.assert_array_equal(cells[layer], expected, err_msg=f"{kind} {layer}")
    bottom_left = panels[4]  # gate_proj; inner panels share its labelled axes
    assert (bottom_left.get_xlabel(), bottom_left.get_ylabel()) == ("optimizer step", "layer")


def test_loss_figure_draws_the_logged_losses():
    fig = loss_figure(read_run(FIXTURES / "molf"))
    (line,) = fig.axes[0].get_lines()
    rows = [json.loads(x) for x in (FIXTURES / "molf" / "metrics.jsonl").read_text().split("\n")
            if x]
    np.testing.assert_array_equal(line.get_xdata(), [r["step"] for r in rows])
    np.testing.assert_allclose(line.get_ydata(), [r["loss"] for r in rows])
    assert fig.axes[0].get_xlabel() == "optimizer step"
    assert fig.axes[0].get_title() == "Training loss: molf, qwen2.5-0.5b, task fact"


def test_an_unrouted_run_gets_the_loss_curve_only(tmp_path):
    run = tmp_path / "lora"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"mode": "lora", "model": "m"}))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": null}\n')
    assert [p.name for p in plot_run(run)] == ["loss.png"]


def test_top2_heatmap_cell_is_the_highest_scoring_applied_expert(tmp_path):
    run = shutil.copytree(FIXTURES / "molfe", tmp_path / "run")
    row = {"step": 1, "winners": [[0, 1, 1]] * 14, "scores": [[None, 1.0, 3.0]] * 14}
    (run / "routing.jsonl").write_text(json.dumps(row) + "\n")
    assert (read_run(run).routing.top_winner() == 2).all()


def test_a_resumed_log_keeps_the_last_record_of_each_step(tmp_path):
    run = shutil.copytree(FIXTURES / "molf", tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 9.5}\n{"step": 24, "loss": 0.5}\n')
    record = read_run(run)
    assert list(record.metric_steps) == [4, 8, 12, 16, 20, 24]
    assert record.loss[1] == 9.5


@pytest.mark.parametrize("name,damage,message", [
    ("routing.jsonl", "delete", "routing.jsonl: missing"),
    ("routing.jsonl", "empty", "routing.jsonl: empty"),
    ("metrics.jsonl", "delete", "metrics.jsonl: missing"),
    ("metrics.jsonl", "empty", "metrics.jsonl: empty"),
    ("routing_modules.json", "empty", "routing_modules.json: empty"),
    ("run_config.json", "delete", "run_config.json: missing"),
    ("routing.jsonl", "short_row", r"routing.jsonl:2: 'winners' has shape \(13, 2\)"),
    ("metrics.jsonl", "garbage", "metrics.jsonl:1: not valid JSON"),
])
def test_missing_or_broken_files_are_named(tmp_path, name, damage, message):
    run = shutil.copytree(FIXTURES / "molf", tmp_path / "run")
    path = run / name
    if damage == "delete":
        path.unlink()
    elif damage == "empty":
        path.write_text("")
    elif damage == "garbage":
        path.write_text("{oops\n" + path.read_text())
    else:
        lines = path.read_text().splitlines()
        row = json.loads(lines[1])
        row["winners"] = row["winners"][:-1]
        lines[1] = json.dumps(row)
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        plot_run(run, tmp_path / "out")


def test_cli_plot_prints_the_files_or_one_error_line(tmp_path, capsys):
    assert cli.main(["plot", str(FIXTURES / "molfe"), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [
        str(tmp_path / n) for n in ("routing_fraction.png", "routing_heatmap.png", "loss.png")]

    assert cli.main(["plot", str(tmp_path / "nowhere")]) != 0
    err = capsys.readouterr().err
    assert "nowhere: no such run directory" in err and "Traceback" not in err
