"""vtrim_get_memory / Model.memory() / `pyvtrim info --memory`: the bytes a model and a context hold, against
the arithmetic of their shapes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import pyvtrim


def test_memory_matches_the_shapes(llava_tiny):
    with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=512, kv_type="f16", n_threads=2) as m:
        info = m.info
        before = m.memory()
        ids = m.tokenize(m.chat_prompt("What is it?", 1))
        m.forward(ids, [np.zeros((30, 30, 3), np.uint8)])
        after = m.memory()
    weights = after["weights_text"] + after["weights_vision"] + after["weights_projector"]
    assert weights == info["n_bytes"] and after["weights_vision"] > 0 and after["weights_projector"] > 0
    assert after["weights_mapped"] == info["n_bytes"] and after["weights_rpc"] == 0
    head_dim = info["n_embd"] // info["n_head"]
    kv = 2 * info["n_layer"] * 512 * info["n_head_kv"] * head_dim * 2   # K and V, f16
    assert kv <= after["kv_cache"] <= kv + 4096 * info["n_layer"]       # + the buffer's alignment padding
    assert after["kv_cache"] == before["kv_cache"]                        # allocated once, for n_ctx
    assert after["compute"] > 0 and after["compute"] >= before["compute"]
    assert after["image_embeddings"] >= info["n_image_tokens"] * info["n_embd"] * 4
    assert after["host_logits"] == info["n_vocab"] * 4


def test_info_memory_cli(llava_tiny):
    run = subprocess.run([sys.executable, "-m", "pyvtrim.cli", "info", str(llava_tiny.gguf), "--memory",
                          "--n-ctx", "1024"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = {line.split("  ")[0]: line for line in run.stdout.splitlines()}
    assert "KV cache (1024 positions, f16)" in lines and "weights: vision tower" in lines
    assert "total here" in lines and "MiB" in lines["total here"]
