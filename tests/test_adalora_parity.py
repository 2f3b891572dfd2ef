"""AdaLoRA in molf_jax against peft's AdaLoRA, step for step (torch on CPU).

A tiny random Qwen2 gets AdaLoRA triplets in peft (``get_peft_model``) and in molf_jax (scanned
layers, the training step of ``make_train_step``); our triplets start as copies of peft's. Both
train 32 steps on the same batches with AdamW and the orthogonality penalty, peft calling
``update_and_allocate(t)`` after ``optimizer.step()`` as its docs say. The schedule (tinit 3,
tfinal 6, deltaT 2) gives eleven pruning allocations, the forced final one and five steps that
re-apply the final pattern. At every step the kept singular values of every module must be the
same and every factor within 1e-4 of its tensor's scale (the largest magnitude that tensor
reaches in peft's run: a singular value vector pruned down to one tiny survivor would otherwise
turn float32 noise into a large ratio).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from tiny_hf import VOCAB, qwen2_config, random_model, save

from molf_jax import models
from molf_jax.adalora import (AdaLoraSchedule, AdaLoraSpec, adalora_allocate, add_adalora,
                              find_allocator_state, orth_regularizer)
from molf_jax.checkpoints import load_hf
from molf_jax.models import PROJECTIONS
from molf_jax.train import make_train_step
from molf_jax.param_roles import param_roles, split_trainable

STEPS, INIT_R, TARGET_R, TINIT, TFINAL, DELTA_T = 32, 6, 3, 3, 6, 2
LR, WD, ORTH, ALPHA = 2e-2, 0.01, 0.5, 8.0
ROWS, LENGTH, PROMPT = 2, 16, 4
TOL = 1e-4


def batches():
    rng = np.random.RandomState(0)
    for _ in range(STEPS):
        ids = rng.randint(3, VOCAB, (ROWS, LENGTH)).astype(np.int64)
        loss_mask = np.ones_like(ids)
        loss_mask[:, :PROMPT] = 0
        yield ids, loss_mask


def peft_run(folder):
    """Per step: {module: kept mask [r]} and {module: (A, E, B)} after update_and_allocate."""
    torch.manual_seed(1)
    base = transformers_model(folder)
    config = peft.AdaLoraConfig(
        init_r=INIT_R, target_r=TARGET_R, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T,
        beta1=0.85, beta2=0.85, orth_reg_weight=ORTH, lora_alpha=ALPHA, lora_dropout=0.0,
        total_step=STEPS, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    initial = factors(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                  weight_decay=WD, betas=(0.9, 0.999), eps=1e-8)
    patterns, params = [], []
    for t, (ids, loss_mask) in enumerate(batches()):
        labels = np.where(loss_mask == 1, ids, -100)
        out = model(input_ids=torch.tensor(ids), labels=torch.tensor(labels))
        out.loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(t)
        optimizer.zero_grad()
        pattern = model.peft_config["default"].rank_pattern
        patterns.append({name: np.ones(INIT_R, bool) for name in initial} if pattern is None
                        else {k.replace(".lora_E.default", ""): np.array(v, bool)
                              for k, v in pattern.items()})
        params.append(factors(model))
    return initial, patterns, params


def transformers_model(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def factors(model):
    """{HF module name: (A [r, in], E [r], B [out, r])} as numpy."""
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            out[name] = tuple(t.detach().numpy().copy() for t in (
                module.lora_A["default"], module.lora_E["default"][:, 0],
                module.lora_B["default"]))
    return out


def hf_name(path, layer):
    """``layers/self_attn/q_proj`` (scanned) and a layer index -> peft's module name."""
    return f"model.layers.{layer}.{path.split('/', 1)[1].replace('/', '.')}"


def our_triplets(params):
    for group in ("self_attn", "mlp"):
        for name, linear in params["layers"][group].items():
            if "adalora" in linear:
                yield f"layers/{group}/{name}", linear["adalora"]


def as_hf(params, num_layers):
    """Our scanned triplets in peft's layout: {HF module: (A, E, B)}."""
    out = {}
    for path, t in our_triplets(params):
        a, e, b = (np.asarray(t[k]) for k in ("a", "e", "b"))
        for layer in range(num_layers):
            out[hf_name(path, layer)] = (a[layer].T, e[layer], b[layer].T)
    return out


def keep_as_hf(keep, num_layers):
    out = {}
    for group in ("self_attn", "mlp"):
        for name, node in keep["layers"][group].items():
            mask = np.asarray(node["adalora"])
            for layer in range(num_layers):
                out[hf_name(f"layers/{group}/{name}", layer)] = mask[layer]
    return out


def copy_initial(params, initial, num_layers):
    """Our triplets set to peft's initial factors (transposed into our layout)."""
    def stacked(path, index, transpose):
        slices = [initial[hf_name(path, layer)][index] for layer in range(num_layers)]
        return jnp.asarray(np.stack([s.T if transpose else s for s in slices]))

    for path, t in list(our_triplets(params)):
        group, name = path.split("/")[1:]
        params["layers"][group][name]["adalora"] = {
            "a": stacked(path, 0, True), "e": stacked(path, 1, False),
            "b": stacked(path, 2, True)}
    return params


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tiny = qwen2_config(hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    folder = save(random_model(tiny), tmp_path_factory.mktemp("adalora") / "qwen2")
    initial, peft_patterns, peft_params = peft_run(folder)

    config, params = load_hf(folder, scan_layers=True)
    spec = AdaLoraSpec(init_r=INIT_R, alpha=ALPHA, dropout=0.0)
    params = copy_initial(add_adalora(params, spec, jax.random.key(0)), initial,
                          config.num_layers)
    model = models.build_model(config, lora=spec, scan_layers=True)
    schedule = AdaLoraSchedule(total_step=STEPS, init_r=INIT_R, target_r=TARGET_R, tinit=TINIT,
                               tfinal=TFINAL, deltaT=DELTA_T, beta1=0.85, beta2=0.85)
    tx = adalora_allocate(optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WD),
                          schedule)
    roles = param_roles(params, train_base=False, train_others=False)  # the triplets alone
    trainable, _ = split_trainable(params, roles)
    opt_state = tx.init(trainable)
    step = jax.jit(make_train_step(model, tx, roles=roles, dropout=False,
                                   regularizer=lambda p: ORTH * orth_regularizer(p)))
    ours_patterns, ours_params, budgets = [], [], []
    for t, (ids, loss_mask) in enumerate(batches()):
        batch = {"input_ids": jnp.asarray(ids[None], jnp.int32),
                 "attention_mask": jnp.ones((1, ROWS, LENGTH), jnp.int32),
                 "loss_mask": jnp.asarray(loss_mask[None], jnp.int32),
                 "step": jnp.int32(t)}
        params, opt_state, _ = step(params, opt_state, batch)
        state = find_allocator_state(opt_state)
        ours_patterns.append(keep_as_hf(state.keep, config.num_layers))
        ours_params.append(as_hf(params, config.num_layers))
        budgets.append(int(state.budget))
    return peft_patterns, peft_params, ours_patterns, ours_params, budgets


def test_masks_identical_to_peft_at_every_step(runs):
    peft_patterns, _, ours_patterns, _, budgets = runs
    for t, (theirs, ours) in enumerate(zip(peft_patterns, ours_patterns)):
        assert set(theirs) == set(ours), t
        differing = [m for m in theirs if not np.array_equal(theirs[m], ours[m])]
        assert not differing, f"step {t}: kept singular values differ in {differing[:3]}"
    # The schedule really pruned, several times, down to the target budget.
    kept = [sum(int(m.sum()) for m in p.values()) for p in ours_patterns]
    modules = len(ours_patterns[0])
    assert kept[0] == modules * INIT_R
    assert len(set(kept)) >= 3, kept
    assert kept[-1] == budgets[-1] == modules * TARGET_R


def test_factors_match_peft_at_every_step(runs):
    _, peft_params, _, ours_params, _ = runs
    scales = {(module, i): max(np.max(np.abs(step[module][i])) for step in peft_params)
              for module in peft_params[0] for i in range(3)}
    worst = 0.0
    for t, (theirs, ours) in enumerate(zip(peft_params, ours_params)):
        for module, tensors in theirs.items():
            for i, (name, ref, got) in enumerate(zip("AEB", tensors, ours[module])):
                error = np.max(np.abs(got - ref)) / scales[module, i]
                worst = max(worst, error)
                assert error <= TOL, f"step {t} {module} {name}: {error:.2e} of its scale"
    assert worst > 0  # the two frameworks did not share one buffer
    print(f"worst factor difference over {STEPS} steps: {worst:.2e} of the tensor's scale")


def test_pruned_singular_values_are_exactly_zero(runs):
    _, _, ours_patterns, ours_params, _ = runs
    last_pattern, last_params = ours_patterns[-1], ours_params[-1]
    for module, mask in last_pattern.items():
        e = last_params[module][1]
        assert np.all(e[~mask] == 0.0), module
        assert np.all(e[mask] != 0.0), module
