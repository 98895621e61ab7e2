"""Session fixtures: tiny random-weight LLaVA models (HF directory + GGUF conversions).

Built once and cached under $VTRIM_CACHE_DIR/fixtures (default ~/.cache/pyvtrim/fixtures), keyed by
a hash of the model parameters (and transformers' version); the GGUF files are keyed by a hash of
the converter's sources too, so editing the converter re-converts. Set VTRIM_FIXTURE_DIR to put
them elsewhere (e.g. a fresh temporary directory).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

import fixtures


def fixture_root() -> Path:
    d = os.environ.get("VTRIM_FIXTURE_DIR")
    return Path(d) if d else fixtures.cache_root() / "fixtures"


def converter_hash() -> str:
    import pyvtrim.conversion as conv

    h = hashlib.sha256()
    for f in sorted(Path(conv.__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


class TinyLlava:
    """A tiny LLaVA: ``hf_dir`` (transformers format) and its GGUF conversions, made on first use."""

    def __init__(self, hf_dir: Path, params: dict):
        self.hf_dir = Path(hf_dir)
        self.params = params
        self._paths = {}

    def gguf_path(self, outtype: str = "f32", layout: str = "single") -> Path:
        """The converted file (for layout "llama.cpp": the text file; mmproj_path() gives the other)."""
        key = (outtype, layout)
        if key not in self._paths:
            from pyvtrim.conversion import convert

            d = self.hf_dir / f"gguf-{converter_hash()}"
            if not d.is_dir():
                for stale in self.hf_dir.glob("gguf-*"):  # conversions by an older converter
                    shutil.rmtree(stale, ignore_errors=True)
                d.mkdir(exist_ok=True)
            stem = "model" if layout == "single" else "text"
            out = d / f"{stem}-{outtype}.gguf"
            paths = [out] if layout == "single" else [out, out.with_name("mmproj-" + out.name)]
            if not all(p.is_file() for p in paths):
                convert(self.hf_dir, out, outtype=outtype, layout=layout)
            self._paths[key] = out
        return self._paths[key]

    def mmproj_path(self, outtype: str = "f32") -> Path:
        text = self.gguf_path(outtype, "llama.cpp")
        return text.with_name("mmproj-" + text.name)

    @property
    def gguf(self) -> Path:
        return self.gguf_path("f32")

    @property
    def gguf_f16(self) -> Path:
        return self.gguf_path("f16")

    @property
    def gguf_q8(self) -> Path:
        return self.gguf_path("q8_0")

    def __repr__(self):
        return f"TinyLlava({self.hf_dir})"


@pytest.fixture(scope="session")
def tiny_llava_factory():
    """make(**params) -> TinyLlava, for variants beyond the named fixtures (see fixtures.tiny_llava_params)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    made = {}

    def make(**params) -> TinyLlava:
        p = fixtures.tiny_llava_params(**params)
        key = fixtures.params_key(dict(p, _transformers=transformers.__version__, _fixture=fixtures.FIXTURE_VERSION))
        if key not in made:
            d = fixtures.cached_tiny_llava(fixture_root(), key=key, **p)
            made[key] = TinyLlava(d, p)
        return made[key]

    return make


@pytest.fixture(scope="session")
def llava_tiny(tiny_llava_factory) -> TinyLlava:
    """Multi-head attention (4 heads, 4 KV heads), rope_theta 10000."""
    return tiny_llava_factory(n_kv_heads=4)


@pytest.fixture(scope="session")
def llava_tiny_gqa(tiny_llava_factory) -> TinyLlava:
    """Grouped-query attention (4 heads, 2 KV heads) and a non-default rope_theta (50000)."""
    return tiny_llava_factory(n_kv_heads=2, rope_theta=50000.0)


@pytest.fixture(scope="session")
def llava_tiny_pad(tiny_llava_factory) -> TinyLlava:
    """LlavaImageProcessor with do_pad=True (pad to a square before resizing) and a GELU vision tower."""
    return tiny_llava_factory(n_kv_heads=4, do_pad=True, vision_act="gelu", seed=3)


@pytest.fixture(scope="session")
def llama_spm_vocab() -> Path:
    """The archive's Llama-2 vocabulary GGUF (with .inp/.out test vectors next to it)."""
    try:
        return fixtures.vocab_path("ggml-vocab-llama-spm.gguf")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def spm_tokenizer_model(llama_spm_vocab) -> Path:
    """A SentencePiece tokenizer.model rebuilt from the Llama-2 vocabulary GGUF."""
    pytest.importorskip("sentencepiece")
    return fixtures.spm_tokenizer_model()


# ------------------------------------------------------------------------------------------------
# Tiny Llama-3.2-Vision ("mllama") models (tests/fixtures_mllama.py)
# ------------------------------------------------------------------------------------------------

import fixtures_mllama  # noqa: E402


class TinyMllama(TinyLlava):
    """A tiny mllama: ``hf_dir`` (transformers format) and its GGUF conversions (single layout only),
    made on first use; ``tokenizer_json`` is its Llama-3 tokenizer.json."""

    def gguf_path(self, outtype: str = "f32", layout: str = "single") -> Path:
        if layout != "single":
            raise ValueError("mllama has only the single-file layout")
        return super().gguf_path(outtype, layout)

    def mmproj_path(self, outtype: str = "f32") -> Path:
        raise ValueError("mllama has only the single-file layout")

    @property
    def tokenizer_json(self) -> Path:
        return self.hf_dir / "tokenizer.json"

    def __repr__(self):
        return f"TinyMllama({self.hf_dir})"


@pytest.fixture(scope="session")
def tiny_mllama_factory():
    """make(**params) -> TinyMllama, for variants beyond the named fixtures (see fixtures_mllama.tiny_mllama_params)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    try:
        fixtures.vocab_path("ggml-vocab-llama-bpe.gguf")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    made = {}

    def make(**params) -> TinyMllama:
        p = fixtures_mllama.tiny_mllama_params(**params)
        key = fixtures.params_key(dict(p, _transformers=transformers.__version__,
                                       _fixture=fixtures_mllama.FIXTURE_VERSION))
        if key not in made:
            d = fixtures_mllama.cached_tiny_mllama(fixture_root(), key=key, **p)
            made[key] = TinyMllama(d, p)
        return made[key]

    return make


@pytest.fixture(scope="session")
def mllama_tiny(tiny_mllama_factory) -> TinyMllama:
    """5 text layers with cross-attention at [1, 3], GQA (4 heads, 2 KV heads), llama3 RoPE scaling;
    vision 28px tiles (4 patches + CLS), 3 local + 2 global layers, intermediate layers [0, 2]."""
    return tiny_mllama_factory()


@pytest.fixture(scope="session")
def mllama_tiny_b(tiny_mllama_factory) -> TinyMllama:
    """4 text layers with cross-attention at [2, 3] (consecutive, the last one cross), 6 heads / 3 KV heads,
    plain RoPE (theta 1e4); vision 56px tiles (16 patches + CLS), 4 local + 1 global layer, layers [1, 3]."""
    return tiny_mllama_factory(**fixtures_mllama.TINY_B)


@pytest.fixture(scope="session")
def llama_bpe_vocab() -> Path:
    """The archive's Llama-3 vocabulary GGUF (with .inp/.out test vectors next to it)."""
    try:
        return fixtures.vocab_path("ggml-vocab-llama-bpe.gguf")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def llama3_tokenizer_json(llama_bpe_vocab) -> Path:
    """The Llama-3.2-Vision tokenizer.json rebuilt from the Llama-3 vocabulary GGUF."""
    return fixtures_mllama.llama3_tokenizer_json()
