"""A LoRA linear whose base kernel trains too: one dense matmul, expert gradients from the
kernel's.

With ``W' = W + sum_i s_i a_i b_i`` the layer is ``y = x W'``, so the kernel's gradient is
``G = x^T dy`` and, by the chain rule through ``W'``, every expert's gradients follow from it:
``da_i = s_i G b_i^T`` and ``db_i = s_i a_i^T G``. MoLF's FFT expert computes ``G`` anyway, so the
LoRA experts cost a few ``[in, r] x [r, out]`` products per step (independent of the number of
tokens) instead of token-sized skinny matmuls (two per expert in each forward pass, four in the
backward pass). The gradients are exact; only bf16 rounding differs from the factored form.
Qwen2.5-1.5B molf on an H200: 29.1k -> 31.5k tokens/s (docs/performance.md, "Speed on an H200").

Used only under differentiation: evaluated plainly (evaluation, decoding) the function is the
factored ``x W + sum_i s_i (x a_i) b_i``, which is cheaper when there are few tokens. LoRA
dropout (a mask on the experts' input only) cannot be folded into ``W'``; the caller keeps the
factored path while dropout is active.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp

__all__ = ["merged_lora_linear"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def merged_lora_linear(x: jax.Array, kernel: jax.Array, a: tuple[jax.Array, ...],
                       b: tuple[jax.Array, ...], scales: tuple[float, ...],
                       keep_merged: bool = False) -> jax.Array:
    """``x @ kernel + sum_i scales[i] * (x @ a[i]) @ b[i]``, differentiated through the merged
    kernel.

    Args:
      x: [..., in]. kernel: [in, out]. a: experts' [in, r_i]. b: experts' [r_i, out], all in
        the compute dtype.
      scales: the experts' ``s_i`` (static).
      keep_merged: keep the merged kernel from the forward pass for the backward pass rather
        than rebuilding it there (static). Right under rematerialisation, where the forward
        runs again just before the backward and the kernel lives for one layer only; without
        it, every layer's merged kernel would stay alive through the whole backward.

    Example:
      >>> x, w = jnp.ones((2, 4)), jnp.eye(4)
      >>> a, b = (jnp.ones((4, 1)),), (jnp.ones((1, 4)),)
      >>> merged_lora_linear(x, w, a, b, (0.5,))[0].tolist()
      [3.0, 3.0, 3.0, 3.0]
    """
    y = jnp.dot(x, kernel)
    for a_i, b_i, s_i in zip(a, b, scales):
        y = y + s_i * jnp.dot(jnp.dot(x, a_i), b_i)
    return y


def _merged_kernel(kernel, a, b, scales):
    """``kernel + [s_1 a_1 .. s_E a_E] [b_1; ..; b_E]``: one product for all experts, added to
    the kernel in the compute dtype (the shape of a GEMM with an addend, which XLA's GPU GEMM
    rewriter can fuse, rather than a float32 product and a separate cast)."""
    scaled_a = jnp.concatenate([s_i * a_i for a_i, s_i in zip(a, scales)], axis=1)
    return kernel + jnp.dot(scaled_a, jnp.concatenate(b, axis=0))


def _forward(x, kernel, a, b, scales, keep_merged):
    merged = _merged_kernel(kernel, a, b, scales)
    return jnp.dot(x, merged), (x, kernel, a, b, merged if keep_merged else None)


def _backward(scales, keep_merged, residuals, dy):
    x, kernel, a, b, merged = residuals
    if merged is None:  # weight-sized: rebuilt (one [in, R] x [R, out] product) when not kept
        merged = _merged_kernel(kernel, a, b, scales)
    # Products contract the named axes directly (no transposed copies): under FSDP a transposed
    # merged kernel is a different array, gathered again instead of sharing the forward's gather.
    dx = _contract(dy, merged, dy.ndim - 1, 1)
    rows_x = x.reshape(-1, x.shape[-1])
    rows_dy = dy.reshape(-1, dy.shape[-1])
    grad_kernel = _contract(rows_x, rows_dy, 0, 0).astype(kernel.dtype)
    # One product each against all experts' stacked factors, split per expert afterwards.
    splits = list(itertools.accumulate(a_i.shape[1] for a_i in a))[:-1]
    da_all = _contract(grad_kernel, jnp.concatenate(b, axis=0), 1, 1)
    db_all = _contract(jnp.concatenate(a, axis=1), grad_kernel, 0, 0)
    da = tuple((s_i * part).astype(a_i.dtype)
               for part, a_i, s_i in zip(jnp.split(da_all, splits, axis=1), a, scales))
    db = tuple((s_i * part).astype(b_i.dtype)
               for part, b_i, s_i in zip(jnp.split(db_all, splits, axis=0), b, scales))
    return dx.astype(x.dtype), grad_kernel, da, db


def _contract(lhs, rhs, lhs_axis, rhs_axis):
    """``lhs`` and ``rhs`` multiplied over one axis each (a transpose-free ``tensordot``)."""
    return jax.lax.dot_general(lhs, rhs, (((lhs_axis,), (rhs_axis,)), ((), ())))


merged_lora_linear.defvjp(_forward, _backward)
