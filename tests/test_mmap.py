"""Memory-mapped weights (use_mmap, the default on the CPU) against weights read into the heap.

The mapped model computes on the same bytes, so the logits are compared for equality. That the weights
really are the file's pages is read off /proc (Linux): loading a mapped model grows the process's anonymous
memory by a small fraction of the weights, a heap load by all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import pyvtrim


def _run(path, use_mmap, mmproj=None):
    with pyvtrim.Model(str(path), mmproj=None if mmproj is None else str(mmproj), n_ctx=256, kv_type="f32",
                       n_threads=2, use_mmap=use_mmap) as m:
        img = np.random.default_rng(0).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
        ids = m.tokenize(m.chat_prompt("What is it?", 1))
        return np.stack([m.forward(ids, [img]), m.decode(17)]), dict(m.info)


@pytest.mark.parametrize("layout", ["single", "llama.cpp"])
def test_llava_mapped_equals_heap(llava_tiny, layout):
    path = llava_tiny.gguf_path("f16", layout)
    mmproj = llava_tiny.mmproj_path("f16") if layout == "llama.cpp" else None
    a, info_a = _run(path, True, mmproj)
    b, info_b = _run(path, False, mmproj)
    assert np.array_equal(a, b)
    assert info_a["n_bytes_mapped"] == info_a["n_bytes"] > 0 and info_b["n_bytes_mapped"] == 0


def test_mllama_mapped_equals_heap(mllama_tiny):
    def run(use_mmap):
        with pyvtrim.Model(str(mllama_tiny.gguf), n_ctx=256, n_threads=2, use_mmap=use_mmap) as m:
            img = np.random.default_rng(1).integers(0, 256, size=(28, 56, 3), dtype=np.uint8)
            return m.forward(m.tokenize(m.chat_prompt("What is it?", 1)), [img])
    assert np.array_equal(run(True), run(False))


_RSS = r"""
import json, sys
import pyvtrim
def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
path, use_mmap = sys.argv[1], sys.argv[2] == "1"
pyvtrim.Model(path, vocab_only=True).close()   # the library and the tokenizer loaded first: not counted
before = anon_kib()
m = pyvtrim.Model(path, n_ctx=64, n_threads=1, use_mmap=use_mmap)
print(json.dumps({"grew_kib": anon_kib() - before, "weights_kib": m.info["n_bytes"] // 1024}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_mapped_weights_are_not_anonymous_memory(tiny_llava_factory):
    fx = tiny_llava_factory(text_hidden=256, text_ff=512, n_layers=4, n_heads=4, n_kv_heads=2, vision_hidden=256,
                            vision_ff=512, vision_layers=3, vision_heads=4, image_size=48, patch_size=6, seed=7,
                            text_init=0.04, vision_init=0.04)   # test_quantize.py's: ~90 MB of f32 weights
    got = {}
    for flag in ("1", "0"):
        run = subprocess.run([sys.executable, "-c", _RSS, str(fx.gguf), flag], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        got[flag] = json.loads(run.stdout.strip().splitlines()[-1])
    weights = got["1"]["weights_kib"]
    assert got["1"]["grew_kib"] < 0.25 * weights, got   # the KV cache and compute buffers, not the weights
    assert got["0"]["grew_kib"] > 0.9 * weights, got
