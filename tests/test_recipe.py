"""The authors' recipe as the modes' defaults, the HF-Trainer warm-up, and scores by import path."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molf_jax.routing import ExpertInfo, epd, resolve_score
from molf_jax.train.config import ConfigError, TrainConfig
from molf_jax.train.modes import make_schedule



@pytest.mark.parametrize("mode, ranks, alphas, lora_lr, top_k", [
    # arXiv 2605.07111 and the authors' scripts (docs/design.md section 1).
    ("molf", (128,), (32.0,), 5e-5, 1),
    ("molf_gate", (128,), (32.0,), 5e-5, 1),
    ("molfe", (32, 128), (32.0, 32.0), 5e-5, 2),
    ("lora", (32,), (11.0,), 5e-4, 1),
])
def test_each_mode_defaults_to_the_authors_recipe(mode, ranks, alphas, lora_lr, top_k):
    config = TrainConfig(mode=mode)
    assert (config.ranks, config.alphas, config.lora_learning_rate, config.routing_top_k) == (
        ranks, alphas, lora_lr, top_k)
    assert (config.fft_lr, config.fft_weight_decay, config.lora_weight_decay,
            config.lora_dropout, config.rslora, config.warmup_ratio, config.schedule) == (
        5e-5, 0.1, 0.01, 0.05, True, 0.1, "cosine")


def test_explicit_settings_override_the_recipe():
    config = TrainConfig(mode="molfe", lora_lr=1e-3, top_k=1, lora_alpha=(16.0,))
    assert (config.lora_learning_rate, config.routing_top_k, config.alphas) == (
        1e-3, 1, (16.0, 16.0))
    # The recipe follows the mode, also through replace().
    assert TrainConfig(mode="molf").replace(mode="lora").lora_learning_rate == 5e-4


def test_warmup_is_the_ceiling_of_ratio_times_steps_as_in_hf_trainer():
    schedule = make_schedule(TrainConfig(), 1.0, 24)  # ceil(2.4) = 3 warm-up steps
    assert [float(schedule(i)) for i in range(4)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert float(schedule(4)) < 1.0


def test_a_score_of_your_own_by_import_path():
    name = "molf_jax.experiments.scores:epd_without_lr"
    own = resolve_score(name)
    assert TrainConfig(score=name).score == name
    k1, k2 = jax.random.split(jax.random.key(0))
    mu, nu = jax.random.normal(k1, (3, 4)), jax.random.uniform(k2, (3, 4))
    info = ExpertInfo(num_params=jnp.full((1, 2), 12.0), learning_rate=jnp.array([[2e-3, 5e-5]]),
                      count=jnp.array(3))

    def scores(score):
        total = jnp.sum(score.elementwise(mu, nu, None, None))
        return score.combine(jnp.full((1, 2), total), info)

    # EPD without the rate: EPD divided by each expert's learning rate.
    np.testing.assert_allclose(scores(own), scores(epd) / info.learning_rate, rtol=1e-6)


def test_a_score_path_that_does_not_resolve_is_a_config_error():
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig(score="no_such_module_here:score")
    with pytest.raises(ConfigError, match="not a molf_jax.routing.Score"):
        TrainConfig(score="math:pi")


def test_the_cli_stops_with_status_2_on_a_score_that_does_not_resolve(capsys):
    from molf_jax.cli import main

    assert main(["train", "--score", "no_such_module_here:score"]) == 2
    assert "routing score 'no_such_module_here:score' not found" in capsys.readouterr().err
