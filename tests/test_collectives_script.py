"""molf_jax.benchmarks.collectives (scripts/collectives.py): the HLO walker's byte counts, and
the benchmark's step on 4 of the devices."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from molf_jax.benchmarks import collectives
from molf_jax.benchmarks import step as bench


def test_walker_counts_each_kind_with_ring_bytes_and_loop_trips():
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))

    def per_device(x):  # one device's rows, [2, 128] f32
        def body(rows, _):
            gathered = jax.lax.all_gather(rows, "x", tiled=True)  # [8, 128]
            return rows + gathered.reshape(4, 2, 128).sum(0), None

        x, _ = jax.lax.scan(body, x, None, length=3)
        scattered = jax.lax.psum_scatter(jnp.tile(x, (4, 1)), "x", tiled=True)  # [8,128] in
        return jax.lax.psum(x, "x") * scattered

    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    counts = collectives.collective_bytes(collectives.post_spmd_hlo(step.lower(x)), 4)
    full = 8 * 128 * 4  # bytes of the gathered array
    assert counts == {("optimizer", "all-gather"): 3 * full * 3 / 4,  # 3 trips of the scan
                      ("optimizer", "reduce-scatter"): full * 3 / 4,
                      ("optimizer", "all-reduce"): 2 * (full / 4) * 3 / 4}


def test_bench_step_optimizer_moves_no_parameter_sized_arrays():
    # The state laid out like the params (on_mesh) keeps the update local: before that fix the
    # optimizer all-gathered every parameter and gradient each step.
    args = bench.parse_args(["--model", "qwen2.5-0.5b", "--mode", "molf", "--layers", "2",
                             "--lora-ranks", "4", "--batch", "8", "--length", "32"])
    assert jax.device_count() >= 4  # conftest gives 8; the mesh takes the first 4
    traffic, _, trainable_bytes = collectives.step_traffic(args, 4)
    optimizer = {k: v for (p, k), v in traffic.items() if p == "optimizer" and v}
    assert set(optimizer) <= {"all-reduce"}, optimizer
    assert optimizer.get("all-reduce", 0) < 1e-4 * trainable_bytes, optimizer  # scalars only
    assert traffic["layer forward", "all-gather"] > 0 and traffic["layer backward",
                                                                 "reduce-scatter"] > 0
