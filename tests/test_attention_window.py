"""What the GPU-only cuDNN attention path is given, checked on CPU.

`cudnn_attention_kwargs` is handed to `jax.nn.dot_product_attention` with the cuDNN kernel on
GPU. The same arguments run here through JAX's XLA implementation, which reads them with the
same meaning, and must allow exactly the keys transformers' masks allow (causal, padding, Gemma's
sliding window) and that our XLA path's `attention_mask` allows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from molf_jax.models.layers import attention_mask, cudnn_attention_kwargs

LENGTH = 8
SEQ_LENGTHS = np.array([8, 5, 1], np.int32)  # right padding, as the cuDNN path requires
WINDOWS = [None, 1, 3, 4, 8]


def _allowed_keys(kwargs) -> np.ndarray:
    """[B, T, S] keys each query attends to under ``kwargs``: with zero queries and keys the
    weights are uniform over the allowed keys, and values = identity read them out."""
    batch = len(SEQ_LENGTHS)
    q = jnp.zeros((batch, LENGTH, 1, LENGTH))
    k = jnp.zeros((batch, LENGTH, 1, LENGTH))
    v = jnp.broadcast_to(jnp.eye(LENGTH)[None, :, None, :], (batch, LENGTH, 1, LENGTH))
    out = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)
    return np.asarray(out[:, :, 0, :] > 0)


def _transformers_allowed(window) -> np.ndarray:
    rule = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    index = [torch.tensor(i) for i in range(LENGTH)]
    return np.array([[[bool(rule(b, 0, q, kv)) and kv < n for kv in index] for q in index]
                     for b, n in enumerate(SEQ_LENGTHS)])


@pytest.mark.parametrize("window", WINDOWS)
def test_cudnn_arguments_allow_the_keys_transformers_and_the_xla_path_allow(window):
    allowed = _allowed_keys(cudnn_attention_kwargs(jnp.asarray(SEQ_LENGTHS), window))
    valid = np.arange(LENGTH)[None, :] < SEQ_LENGTHS[:, None]
    ours = np.asarray(attention_mask(jnp.arange(LENGTH), jnp.arange(LENGTH), jnp.asarray(valid),
                                     window))[:, 0]
    expected = _transformers_allowed(window)
    for b, n in enumerate(SEQ_LENGTHS):   # padded query rows are never read
        np.testing.assert_array_equal(allowed[b, :n], expected[b, :n], err_msg=f"row {b}")
        np.testing.assert_array_equal(ours[b, :n], expected[b, :n], err_msg=f"row {b}")
    if window is not None and window < LENGTH:
        # The last query of the full row sees exactly `window` keys.
        assert allowed[0, -1].sum() == window


@pytest.mark.parametrize("window", [None, 3])
def test_cudnn_arguments_give_the_xla_paths_attention_with_grouped_heads(window):
    keys = jax.random.split(jax.random.key(0), 3)
    batch, heads, kv_heads, dim = len(SEQ_LENGTHS), 4, 2, 16
    q = jax.random.normal(keys[0], (batch, LENGTH, heads, dim))
    k = jax.random.normal(keys[1], (batch, LENGTH, kv_heads, dim))
    v = jax.random.normal(keys[2], (batch, LENGTH, kv_heads, dim))
    valid = jnp.arange(LENGTH)[None, :] < jnp.asarray(SEQ_LENGTHS)[:, None]
    mask = attention_mask(jnp.arange(LENGTH), jnp.arange(LENGTH), valid, window)
    xla_path = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3, implementation="xla")
    cudnn_args = jax.nn.dot_product_attention(
        q, k, v, scale=0.3, implementation="xla",
        **cudnn_attention_kwargs(valid.sum(-1).astype(jnp.int32), window))
    for b, n in enumerate(SEQ_LENGTHS):
        np.testing.assert_allclose(np.asarray(cudnn_args[b, :n]), np.asarray(xla_path[b, :n]),
                                   rtol=1e-5, atol=1e-6)
