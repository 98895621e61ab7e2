"""ggml's RPC backend: decoder layers on rpc-server processes (the archive's own rpc-server, built as
vtrim-rpc-server), here two of them on loopback ports.

Tolerance: none. The servers run the same ggml CPU kernels on the same f32 weights, and ggml's CPU kernels
give each output element from one thread, so the thread counts (1 per server, 2 locally) do not change the
order of any sum: the logits are compared for equality, prefill and decode, with and without reductions.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import pyvtrim
from pyvtrim import native_cli

from rpc_servers import free_port, start_rpc_server

DECODE = [17, 250, 3, 99]


@pytest.fixture(scope="module")
def servers():
    if "RPC" not in pyvtrim.backends():
        pytest.skip(f"this build has no RPC backend ({pyvtrim.backends()})")
    started = [start_rpc_server() for _ in range(2)]
    yield [endpoint for _, endpoint in started]
    for proc, _ in started:
        proc.terminate()
        proc.wait(timeout=10)


def _layer_bytes(path: Path, layers: range) -> int:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors
               if t.name.startswith("blk.") and int(t.name.split(".")[1]) in layers)


def _run(path: Path, images: list, rpc, reduce=None, question: str = "What is in this picture?"):
    with pyvtrim.Model(str(path), n_ctx=512, kv_type="f32", n_threads=2, rpc=rpc) as m:
        ids = m.tokenize(m.chat_prompt(question, len(images)))
        out = [m.forward(ids, images, reduce=reduce)]
        out += [m.decode(t) for t in DECODE]
        return out, m.info, m.last_stats


def _image(seed: int, h: int = 40, w: int = 60) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def llava4(tiny_llava_factory):
    return tiny_llava_factory(n_layers=4, n_kv_heads=2, image_size=48, patch_size=6, seed=5)


def test_llava_split_over_two_servers_equals_the_local_run(servers, llava4):
    local, _, st_local = _run(llava4.gguf, [_image(1)], None)
    remote, info, st_remote = _run(llava4.gguf, [_image(1)], servers)
    for a, b in zip(local, remote):
        assert np.array_equal(a, b)
    # 4 layers over 3 devices: layers 0-1 on the first server, 2 on the second, 3 here
    assert info["n_rpc_devices"] == 2
    assert info["n_bytes_rpc"] == _layer_bytes(llava4.gguf, range(0, 3)) > 0
    assert info["n_bytes_mapped"] == info["n_bytes"] - info["n_bytes_rpc"]   # the rest: the file's pages
    assert st_remote["kv_cache_bytes"] == st_local["kv_cache_bytes"]


@pytest.mark.parametrize("policy", ["fastv", "vlcache", "fastv+vlcache"])
def test_reductions_over_rpc_equal_the_local_run(servers, llava4, policy):
    """The reductions read scores back and compact the cache on the servers' devices."""
    def policies():
        return [{"fastv": pyvtrim.FastV(k=1, ratio=0.5), "vlcache": pyvtrim.VLCache(budget=0.3)}[p]
                for p in policy.split("+")]
    images = [_image(2), _image(3, 52, 44)]
    local, _, st_local = _run(llava4.gguf, images, None, policies(), "Which of the two is brighter?")
    remote, _, st_remote = _run(llava4.gguf, images, servers, policies(), "Which of the two is brighter?")
    for a, b in zip(local, remote):
        assert np.array_equal(a, b)
    assert st_remote["n_image_tokens_kept"] == st_local["n_image_tokens_kept"]
    assert st_remote["kv_cache_bytes"] == st_local["kv_cache_bytes"]


def test_mllama_split_over_rpc_equals_the_local_run(servers, mllama_tiny):
    """Cross-attention layers go to the servers too; their image K/V (the cross cache) stays here."""
    size = 28
    images = [_image(4, size, 2 * size)]
    local, _, _ = _run(mllama_tiny.gguf, images, None)
    remote, info, _ = _run(mllama_tiny.gguf, images, servers)
    for a, b in zip(local, remote):
        assert np.array_equal(a, b)
    assert info["n_rpc_devices"] == 2 and info["n_bytes_rpc"] > 0


def test_host_bytes_are_counted(servers, llava4):
    _, _, st = _run(llava4.gguf, [_image(5)], servers)
    # at least the logits came back and the ids, image embeddings and positions went in
    assert st["host_bytes_out"] >= 4 * 32064 and st["host_bytes_in"] > 0


def test_unreachable_server_is_an_error_not_an_abort(llava4):
    if "RPC" not in pyvtrim.backends():
        pytest.skip("no RPC backend")
    port = free_port()   # nothing listens there
    with pytest.raises(pyvtrim.VtrimIOError, match=f"cannot connect to RPC server '127.0.0.1:{port}'"):
        pyvtrim.Model(str(llava4.gguf), rpc=f"127.0.0.1:{port}")


@pytest.mark.parametrize("bad", ["localhost", "localhost:", ":50052", "host:0", "host:70000", "host:12x"])
def test_malformed_endpoint_names_it(llava4, bad):
    if "RPC" not in pyvtrim.backends():
        pytest.skip("no RPC backend")
    with pytest.raises(pyvtrim.VtrimValueError, match="expected host:port"):
        pyvtrim.Model(str(llava4.gguf), rpc=bad)


def test_vtrim_cli_over_rpc(servers, llava4, tmp_path):
    from PIL import Image

    img = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(img)
    args = ["-m", str(llava4.gguf), "--image", str(img), "-p", "What is it?", "-n", "4", "-t", "2", "--temp", "0"]
    exe = str(native_cli.executable("vtrim-cli"))
    local = subprocess.run([exe] + args, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    remote = subprocess.run([exe] + args + ["--rpc", ",".join(servers)], capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout
