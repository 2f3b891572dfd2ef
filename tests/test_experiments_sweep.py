"""The reproduction's fast path equals the trainer: a vmapped sweep of seeds (and rates) gives each
member the parameters and the per-case test scores of the same run made alone by `train`."""

import jax
import numpy as np
import pytest

from molf_jax import experiments
from molf_jax.data import pad_token_id
from molf_jax.experiments import Member, member_params, train_members
from molf_jax.experiments.scoring import case_scores
from molf_jax.models import build_model
from molf_jax.param_roles import split_trainable
from molf_jax.train import (assemble_run, load_run, merge_adapters, mode_roles, plan_run,
                            train)
from molf_jax.train.loop import prepare_data
from tiny_run import final_params, tiny_config, tiny_hf_folder

# Two seeds at different rates; dropout on, so the members' dropout keys must follow the seed.
MEMBERS = (Member(seed=0, fft_lr=1e-3, lora_lr=2e-3), Member(seed=1, fft_lr=2e-3, lora_lr=1e-3))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model_dir = tiny_hf_folder(tmp_path_factory.mktemp("model") / "tiny-gemma3", "gemma3")
    alone = []
    for m in MEMBERS:
        out = tmp_path_factory.mktemp(f"alone{m.seed}")
        config = tiny_config(model_dir, out, mode="molf", seed=m.seed, fft_lr=m.fft_lr,
                             lora_lr=m.lora_lr, lora_dropout=0.1, warmup_ratio=0.2,
                             schedule="cosine", steps=5)
        train(config)
        alone.append((config, out))
    config = alone[0][0]
    base = assemble_run(plan_run(config.replace(mode="fft", lora_ranks=None, mesh="fsdp=1")))
    examples = [prepare_data(c, base.tokenizer)[0] for c, _ in alone]
    result = train_members(config, base.source.config, base.params, examples, list(MEMBERS),
                           pad_id=pad_token_id(base.tokenizer))
    return alone, base, result


def test_each_vmapped_member_trains_exactly_as_the_same_run_alone(runs):
    alone, _, result = runs
    assert result.losses.shape == (5, len(MEMBERS)) and np.isfinite(result.losses).all()
    for k, (config, out) in enumerate(alone):
        params = member_params(result, k)
        trained, _ = split_trainable(params, mode_roles(config, params))
        _, reference = final_params(out)
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                             trained, reference)
        assert max(jax.tree.leaves(diffs)) < 1e-4, k
    # The members really differ (seed, data, rates): the check above is not vacuous.
    first, second = (split_trainable(member_params(result, k), mode_roles(config, params))[0]
                     for k in (0, 1))
    gaps = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), first, second))
    assert max(gaps) > 1e-3


def test_the_fast_path_scores_each_case_as_the_trained_run_does(runs):
    alone, base, result = runs
    model = build_model(base.source.config, scan_layers=True)
    config, out = alone[0]
    records = prepare_data(config, base.tokenizer)[1][:6]
    run = load_run(out)
    expected = case_scores("fact", model, merge_adapters(run.params, run.lora), base.tokenizer,
                           records, batch_size=8)
    got = case_scores("fact", model, merge_adapters(member_params(result, 0), result.spec),
                      base.tokenizer, records, batch_size=8)
    assert got == expected
    assert experiments.metric_of("fact", got) == experiments.metric_of("fact", expected)


def test_routed_members_log_their_winners_per_step(runs):
    _, _, result = runs
    steps, members, modules, experts = result.winners.shape
    assert (steps, members, experts) == (5, len(MEMBERS), 2) and modules == len(
        result.module_names)
    assert (result.winners.sum(-1) == 1).all()  # top-1: one winner per module and step


def test_a_program_loaded_from_its_serialized_executables_compiles_nothing_and_trains_the_same(
        runs):
    """What a compile worker hands the runner (`MemberProgram.serialize`) loads into a fresh
    program without any compilation here, and trains the members exactly as before."""
    from molf_jax.experiments.sweep import MemberProgram, member_loss_tokens
    from molf_jax.train import resolve_config

    alone, base, _ = runs
    config = resolve_config(alone[0][0])
    examples = [prepare_data(c, base.tokenizer)[0] for c, _ in alone]
    length, budget = config.max_length, member_loss_tokens(config, examples)
    args = (config, base.source.config, base.params, len(MEMBERS), 5,
            (config.grad_accum, config.batch_size, length))
    jax.config.update("jax_enable_compilation_cache", False)  # as a compile worker does
    try:
        compiled = MemberProgram(*args, loss_tokens=budget).compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    serialized = compiled.serialize()
    compilations = []

    def count(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compilations.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        loaded = MemberProgram(*args, loss_tokens=budget).load(serialized)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compilations == []
    results = [train_members(config, base.source.config, base.params, examples, list(MEMBERS),
                             pad_id=pad_token_id(base.tokenizer), lengths=(length,),
                             program=program) for program in (compiled, loaded)]
    np.testing.assert_array_equal(results[0].losses, results[1].losses)
    for a, b in zip(jax.tree.leaves(results[0].trainable), jax.tree.leaves(results[1].trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
