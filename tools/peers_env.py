"""The peer environment of tools/bench_peers.py and the files every peer reads: llama.cpp's two-file
model layout, a transformers directory with the same random weights, the image and the prompt."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_common import CLIP_L_336 as _CLIP_L_336, TEXT_SHAPES

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PEER_PACKAGES = ["torch==2.13.0", "transformers==5.23.0", "numpy", "pillow", "safetensors", "matplotlib"]

CLIP_L_336 = dict(_CLIP_L_336, projection_dim=768)   # the transformers config wants the projection width
IMAGE_TOKEN = 32000

QUESTION = "Describe this picture in detail, then list every object you can see."
# llama-cpp-python's Llava15ChatHandler: its system message and template, rendered for one image and one question.
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")
PROMPT = f"{SYSTEM}\nUSER: <image>{QUESTION}\nASSISTANT: "

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("VTRIM_CACHE_DIR") or Path.home() / ".cache" / "pyvtrim")


def peers_dir() -> Path:
    return cache_dir() / "peers"


# ------------------------------------------------------------------------------------------------
# The peer environment
# ------------------------------------------------------------------------------------------------


def peer_python() -> Path:
    return peers_dir() / "venv" / "bin" / "python"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip(args, env=None) -> None:
    cmd = [str(peer_python()), "-m", "pip", "install", *args]
    log("$ " + " ".join(cmd))
    logf = peers_dir() / "install.log"
    with open(logf, "a") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"pip failed (exit {rc}); see {logf}")


def ensure_peers(force: bool = False) -> Path:
    """Creates the peer environment once (llama-cpp-python built from source, torch, transformers)."""
    marker = peers_dir() / "ready.json"
    py = peer_python()
    if marker.is_file() and py.is_file() and not force:
        return py
    peers_dir().mkdir(parents=True, exist_ok=True)
    if not py.is_file():
        base = getattr(sys, "_base_executable", None) or sys.executable
        log(f"creating {py.parent.parent} ...")
        subprocess.run([base, "-m", "venv", str(py.parent.parent)], check=True)
    t0 = time.time()
    have = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('llama_cpp_python'))"],
                          capture_output=True, text=True).stdout.strip()
    if have != LLAMA_CPP_PYTHON.split("==")[1]:
        # llama-cpp-python as its users install it: from the sdist, compiled here. The sdist the pyvtrim build
        # already fetched (same pin, checked by hash) saves the download.
        sdist = cache_dir() / "llama_cpp_python-0.3.36.tar.gz"
        spec = str(sdist) if sdist.is_file() and _sha256(sdist) == LLAMA_CPP_PYTHON_SHA256 else LLAMA_CPP_PYTHON
        env = dict(os.environ)
        env["CMAKE_ARGS"] = (env.get("CMAKE_ARGS", "") + " -DGGML_NATIVE=ON").strip()
        log("building llama-cpp-python (llama.cpp + its multimodal library) from source: minutes on 2 cores")
        _pip([spec], env=env)
    _pip(PEER_PACKAGES)
    versions = subprocess.run([str(py), "-c", "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) "
                               "for p in ['llama_cpp_python', 'torch', 'transformers', 'numpy']}))"],
                              check=True, capture_output=True, text=True).stdout.strip()
    marker.write_text(versions)
    log(f"peer environment ready in {time.time() - t0:.0f} s: {versions}")
    return py


# ------------------------------------------------------------------------------------------------
# Models, image, prompt
# ------------------------------------------------------------------------------------------------


def bench_config(text: str) -> dict:
    from pyvtrim.demo import DEMO_CONFIG

    cfg = json.loads(json.dumps(DEMO_CONFIG))
    cfg["text_config"].update(TEXT_SHAPES[text])
    cfg["vision_config"].update(CLIP_L_336)
    return cfg


def preprocessor() -> dict:
    """llava-hf's CLIPImageProcessor at 336 px: resize the shortest edge, center crop, CLIP mean/std."""
    side = CLIP_L_336["image_size"]
    return dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": side},
                resample=3, do_center_crop=True, crop_size={"height": side, "width": side}, do_rescale=True,
                rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
                image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def model_dir(text: str) -> Path:
    return cache_dir() / "bench" / "peers" / text


WRITTEN_TYPES = ("f32", "f16", "bf16", "q8_0")   # the converter's own outtypes


def llamacpp_pair(text: str, outtype: str) -> tuple:
    """llama.cpp's two-file layout (text + mmproj), written by pyvtrim's converter from random weights."""
    from pyvtrim.conversion.llamacpp_layout import mmproj_path
    from pyvtrim.conversion.llava import image_params, parse_llava_config, write_llava
    from pyvtrim.conversion.tensors import ArraySource
    from pyvtrim.demo import demo_tensors, demo_vocab

    out = model_dir(text) / f"llava-clipL336-{text}-{outtype}.gguf"
    proj = mmproj_path(out)
    if outtype not in WRITTEN_TYPES and not (out.is_file() and proj.is_file()):
        # k-quants and q4_0 come from pyvtrim's quantizer on the f16 text file, as a user makes them; the
        # f16 mmproj is shared (a link), so both peers read the same vision weights
        import pyvtrim

        src, src_proj = llamacpp_pair(text, "f16")
        t0 = time.time()
        r = pyvtrim.quantize(src, out, outtype)
        log(f"quantized {out.name} in {time.time() - t0:.0f} s: {r}")
        if proj.exists():
            proj.unlink()
        os.link(src_proj, proj)
    if not (out.is_file() and proj.is_file()):
        cfg = bench_config(text)
        t0 = time.time()
        log(f"writing {out} + {proj.name} (random weights) ...")
        hp = parse_llava_config(cfg, "bench config", name=f"llava-1.5 {text} shape (random weights)")
        image = image_params(preprocessor(), hp.vision, "bench preprocessor")
        tensors, shapes = demo_tensors(cfg)
        vocab = demo_vocab(cfg["text_config"]["vocab_size"])
        write_llava(out, hp, ArraySource(tensors, shapes), vocab, image, outtype, layout="llama.cpp",
                    where="bench model")
        log(f"  done in {time.time() - t0:.0f} s")
    return out, proj


def hf_dir(text: str) -> Path:
    """A transformers directory with the same random weights (f16 safetensors, shards of <= 2 GB)."""
    import numpy as np
    from safetensors.numpy import save_file

    from pyvtrim.demo import demo_tensors

    d = model_dir(text) / "hf"
    done = d / "model.safetensors.index.json"
    if done.is_file():
        return d
    t0 = time.time()
    log(f"writing {d} (the same random weights, safetensors) ...")
    d.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(text)
    (d / "config.json").write_text(json.dumps(dict(cfg, torch_dtype="float16"), indent=2))
    (d / "preprocessor_config.json").write_text(json.dumps(preprocessor(), indent=2))
    tensors, _ = demo_tensors(cfg)
    weight_map, shard, shard_bytes, n_shard, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, n_shard
        if shard:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(d / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            n_shard += 1
            shard, shard_bytes = {}, 0

    for name, make in tensors.items():
        arr = make().astype(np.float16)
        shard[name] = arr
        shard_bytes += arr.nbytes
        total += arr.nbytes
        if shard_bytes >= 2 << 30:
            flush()
    flush()
    done.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    log(f"  done in {time.time() - t0:.0f} s")
    return d


def bench_image() -> Path:
    """A synthetic 640x480 RGB PNG (gradients and a diagonal pattern)."""
    import numpy as np
    from PIL import Image

    path = cache_dir() / "bench" / "peers" / "image-640x480.png"
    if not path.is_file():
        y, x = np.mgrid[0:480, 0:640]
        img = np.stack([(x * 255 // 639), (y * 255 // 479), ((x + y) % 256)], axis=-1).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    return path
