"""molf_jax.benchmarks.gpu_parity (scripts/gpu_parity.py) on CPU: its comparisons pass on the
XLA path and catch a cuDNN window one key too wide (the kernel's call routed to JAX's XLA
implementation, which reads the same arguments)."""

import jax
import pytest

from molf_jax.benchmarks import gpu_parity
from molf_jax.models import layers


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    config = gpu_parity.tiny_configs()["gemma3"]
    return gpu_parity.save_random_model(config, tmp_path_factory.mktemp("parity") / "gemma3")


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    dot_product_attention = jax.nn.dot_product_attention

    def through_xla(*args, implementation=None, **kwargs):
        return dot_product_attention(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", through_xla)


def test_parity_checks_pass_on_cpu_and_catch_a_window_one_key_too_wide(
        gemma_folder, cudnn_on_cpu, monkeypatch, capsys):
    assert gpu_parity.cudnn_status().startswith("no GPU")
    ids, mask = gpu_parity.right_padded_batch(256, 16)
    assert gpu_parity.check_folder("tiny gemma3", gemma_folder, ids, mask, "cudnn")
    out = capsys.readouterr().out
    assert "ok   xla-f32 vs transformers-f32" in out and "FAIL" not in out
    right = layers.cudnn_attention_kwargs
    monkeypatch.setattr(layers, "cudnn_attention_kwargs", lambda lengths, window: {
        **right(lengths, window), "local_window_size": None if window is None else (window, 0)})
    assert not gpu_parity.check_folder("tiny gemma3", gemma_folder, ids, mask, "cudnn")
    assert "FAIL cudnn-bf16 vs xla-bf16" in capsys.readouterr().out
