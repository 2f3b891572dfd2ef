"""Collective traffic of scripts/bench.py's train step, per device and step, from its compiled HLO.

Builds bench's step (its own `setup`, `make_batch`, `train_step`) with abstract parameters on
simulated CPU devices (nothing is allocated), compiles it at 2 and 4 layers, reads the HLO right
after SPMD partitioning and sums every collective's bytes by phase and kind, extrapolated
linearly to the model's layer count (the layers run in one scan: each adds the same traffic).
Bytes are what one device sends under ring algorithms (what NCCL's bus bandwidth divides):
(n-1)/n of the full array for all-gather, reduce-scatter and all-to-all, twice that for
all-reduce, the array for collective-permute. That HLO keeps the program's dtypes (the CPU
pipeline later widens bf16 collectives to f32); an all-reduce whose users all take a 1/n
dynamic slice counts as the reduce-scatter the GPU pipeline makes of it. Phases come from op
names; "optimizer" is everything outside the gradient.

Example (flags other than --devices are scripts/bench.py's):
  python scripts/collectives.py --devices 4 --model qwen2.5-3b --mode molf --batch 32 --length 512
"""

import argparse
import collections
import glob
import math
import os
import re
import sys
import tempfile
from unittest import mock


def _split_argv(argv):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--devices", type=int, default=4, help="simulated CPU devices to compile for")
    return p.parse_known_args(argv)


import jax

from molf_jax.benchmarks import step as bench
from molf_jax.models import preset
from molf_jax.train import (on_mesh, param_sharding, parse_mesh, resolve_config,
                            split_trainable)

KINDS = {"all-gather": "all-gather", "reduce-scatter": "reduce-scatter",
         "all-reduce": "all-reduce", "all-to-all": "all-to-all", "collective-permute": "permute"}
PHASES = ("layer forward", "remat recompute", "layer backward", "loss", "embedding",
          "other model", "optimizer")
PROBE_LAYERS = (2, 4)
IDEAL = ("each layer's parameters all-gathered for the forward, the remat recompute and the "
         "backward, its trainable gradients reduce-scattered once; the other parameters "
         "(embedding, final norm) gathered twice, their gradients scattered once")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[a-z]+(\d+)\w*)\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)"
                      r"=%([\w.\-]+)")


def _with(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def _nbytes(type_text):
    """Bytes of every array in an HLO type (a tuple's arrays summed)."""
    return sum(math.prod(int(d) for d in dims.split(",") if d) * int(bits or 8) // 8
               for _, bits, dims in _ARRAY.findall(type_text))


def _trip_count(computations, attrs):
    """A while loop's trip count: XLA's annotation, else the bound its condition compares the
    counter with (jax's scans and fori_loops count up from 0)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%([\w.\-]+)", attrs).group(1)
    return max((int(m.group(1)) for _, _, op, rest in computations[condition]
                if op == "constant" and (m := re.match(r"(\d+)\)", rest))), default=1)


def _group_size(attrs, devices):
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)?\s*\{([^}]*)\}", attrs)
    if mesh:  # mesh['axis_0'=4,'axis_1'=1] {'axis_0'}: the product of the named axes
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = re.search(r"replica_groups=\[\d+,(\d+)\]<=", attrs)
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if iota or listed:
        return int(iota.group(1)) if iota else len(listed.group(1).split(","))
    if "replica_groups={}" in attrs:
        return devices
    raise ValueError(f"collectives.py cannot read the replica groups of: {attrs[:300]}")


def phase(op_name):
    """The step phase of a collective, from the jaxpr name stack in its op_name."""
    if "jvp(" not in op_name and "transpose(" not in op_name:
        return "optimizer"
    if "CausalLM" not in op_name:
        return "loss"
    if "_layers/while" in op_name:
        if "transpose(" not in op_name:
            return "layer forward"
        return "remat recompute" if "rematted_computation" in op_name else "layer backward"
    return "embedding" if "embed_tokens" in op_name else "other model"


def collective_bytes(hlo, devices):
    """Bytes each device sends per run of an HLO module (text after SPMD partitioning, as from
    `post_spmd_hlo`) over ``devices`` devices, by (phase, kind).

    Example:
      >>> collective_bytes(post_spmd_hlo(jax.jit(f).lower(x)), 4)   # doctest: +SKIP
      Counter({('optimizer', 'all-gather'): 3072.0})
    """
    computations, entry = {}, None
    for line in hlo.splitlines():
        header = not line[:1].isspace() and not line.startswith("HloModule") and \
            _HEADER.match(line)
        if header:
            name = header.group(1)
            computations[name] = []
            entry = name if line.startswith("ENTRY") else entry
        elif computations and (instr := _INSTR.match(line)):
            computations[name].append(instr.groups())  # (name, type, opcode, rest)
    runs = collections.Counter()

    def visit(name, times):  # runs per module run: the product of the enclosing trip counts
        runs[name] += times
        for _, _, opcode, rest in computations[name]:
            branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
            for role, callee in _CALLEES.findall(rest) + [("branch", c) for c in re.findall(
                    r"%([\w.\-]+)", branches.group(1) if branches else "")]:
                body = (opcode, role) == ("while", "body")
                visit(callee, times * (_trip_count(computations, rest) if body else 1))

    visit(entry, 1)
    out = collections.Counter()
    for cname, instrs in computations.items():
        for name, type_text, opcode, rest in instrs:
            if opcode not in KINDS or not runs[cname]:
                continue
            kind, size = KINDS[opcode], _nbytes(type_text)
            n = 1 if kind == "permute" else _group_size(rest, devices)
            if kind == "reduce-scatter":
                size *= n  # its result is one device's piece
            used = re.compile(rf"%{re.escape(name)}(?![\w.\-])")
            users = [(op, t) for _, t, op, r in instrs if used.search(r)]
            if kind == "all-reduce" and users and all(
                    op == "dynamic-slice" and _nbytes(t) * n == size for op, t in users):
                kind = "reduce-scatter"
            sent = size if kind == "permute" else size * (n - 1) / n
            op_name = (re.search(r'op_name="([^"]*)"', rest) or [None, ""])[1]
            out[phase(op_name), kind] += sent * (2 if kind == "all-reduce" else 1) * runs[cname]
    return out


def post_spmd_hlo(lowered):
    """Compiles ``lowered`` and returns its HLO text right after SPMD partitioning."""
    with tempfile.TemporaryDirectory() as tmp:
        lowered.compile(compiler_options={"xla_dump_to": tmp,
                                          "xla_dump_hlo_pass_re": "spmd-partitioning"})
        found = glob.glob(os.path.join(tmp, "*after_spmd-partitioning*.txt"))
        if len(found) != 1:  # a persistent compilation cache hit dumps nothing
            raise RuntimeError(f"expected one post-SPMD HLO dump, found {len(found)} "
                               "(set JAX_ENABLE_COMPILATION_CACHE=false)")
        with open(found[0]) as f:
            return f.read()


def abstract_opt_state(tx, trainable, mesh):
    """bench's ``on_mesh(jax.jit(tx.init)(trainable), mesh)`` on abstract arrays: the init's
    compiled output shardings, then on_mesh's own placement, recorded instead of moved."""
    init = jax.jit(tx.init).lower(trainable).compile()
    abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(abstract, jax.eval_shape(tx.init, trainable), init.output_shardings)
    with mock.patch.object(jax, "device_put", abstract):
        return on_mesh(state, mesh)


def gpu_step(args):
    """bench's arguments for the step it runs on GPUs (their numerics, unless given), with
    XLA's attention in place of cuDNN's, which CPU devices cannot compile."""
    return _with(args, numerics_of=args.numerics_of or "gpu", attention=args.attention or "xla")


def step_traffic(args, devices):
    """Collective bytes of one compile of bench's step, on the first ``devices`` devices.

    ``args`` is `bench.parse_args` output; a -1 in its mesh takes the rest of ``devices``.
    Returns ``(bytes by (phase, kind), parameter bytes, trainable parameter bytes)``.

    Example:
      >>> step_traffic(bench.parse_args(["--layers", "2"]), 4)[0]["optimizer", "all-gather"]
      0
    """
    sizes = parse_mesh(args.mesh, devices)
    args = _with(args, mesh=",".join(f"{a}={n}" for a, n in sizes.items()))
    setup = bench.setup(gpu_step(args))
    rule = param_sharding(setup.mesh)  # bench places every leaf, base and LoRA, with this rule
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=rule("", x.shape)),
                          jax.eval_shape(setup.initial_params))
    trainable, _ = split_trainable(params, setup.roles)
    opt_state = abstract_opt_state(setup.tx, trainable, setup.mesh)
    step = bench.train_step(setup, setup.model(), params, opt_state)
    batch = bench.make_batch(args, setup.model_config.vocab_size, setup.mesh)
    traffic = collective_bytes(post_spmd_hlo(step.lower(params, opt_state, batch)), devices)
    nbytes = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize  # noqa: E731
                              for x in jax.tree.leaves(tree))
    return traffic, nbytes(params), nbytes(trainable)


def extrapolated_traffic(args, devices):
    """`step_traffic` at 2 and 4 layers, extrapolated linearly to ``args.layers`` (default:
    the preset's); returns ``(bytes by (phase, kind), ideal FSDP bytes (`IDEAL`), layers)``,
    e.g. ``extrapolated_traffic(bench.parse_args(["--model", "qwen2.5-3b"]), 4)``."""
    layers = args.layers or preset(args.model).num_layers
    (t2, p2, g2), (t4, p4, g4) = (step_traffic(_with(args, layers=n), devices)
                                  for n in PROBE_LAYERS)
    traffic = {k: t2[k] + (t4[k] - t2[k]) * (layers - 2) / 2 for k in set(t2) | set(t4)}
    per_layer, grads_per_layer = (p4 - p2) / 2, (g4 - g2) / 2
    step_args = gpu_step(args)
    remat = resolve_config(bench.bench_config(step_args), step_args.numerics_of).remat
    gathers = 2 if remat == "none" else 3
    fsdp = parse_mesh(args.mesh, devices)["fsdp"]
    ideal = (fsdp - 1) / fsdp * (layers * (gathers * per_layer + grads_per_layer)
                                 + 2 * (p2 - 2 * per_layer) + (g2 - 2 * grads_per_layer))
    return traffic, ideal, layers


def markdown(args, devices):
    """The table (GiB by phase and kind, totals, ideal FSDP), e.g. ``print(markdown(args, 4))``."""
    traffic, ideal, layers = extrapolated_traffic(args, devices)
    mesh = " ".join(f"{a}={n}" for a, n in parse_mesh(args.mesh, devices).items())
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    kinds = list(KINDS.values())
    lines = [f"## Collectives per device and step (GiB): {args.model} {args.mode}, batch "
             f"{args.batch} x {args.length}, mesh {mesh}", "",
             f"{layers} layers, extrapolated linearly from compiles at 2 and 4 layers on "
             f"{devices} simulated CPU devices (HLO after SPMD partitioning); bytes each device "
             "sends under ring algorithms.", "",
             "| phase | " + " | ".join(kinds) + " | total |", "|---" * (len(kinds) + 2) + "|"]
    for p in PHASES:
        row = [traffic.get((p, k), 0) for k in kinds]
        lines.append(f"| {p} | " + " | ".join(map(gib, row)) + f" | {gib(sum(row))} |")
    sums = [sum(traffic.get((p, k), 0) for p in PHASES) for k in kinds]
    lines.append("| **total** | " + " | ".join(map(gib, sums)) + f" | **{gib(sum(sums))}** |")
    return "\n".join(lines + ["", f"Ideal FSDP: {gib(ideal)} GiB ({IDEAL})."])


def main(argv=None):
    ours, rest = _split_argv(sys.argv[1:] if argv is None else argv)
    print(markdown(bench.parse_args(rest), ours.devices))

