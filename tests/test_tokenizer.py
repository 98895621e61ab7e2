"""The tokenizers (core/src/vocab/*.c) through the Python API, on the real Llama-2 (SentencePiece) and
Llama-3 (byte-level BPE) vocabularies that ship with the pinned llama.cpp archive.

What decides "right":
- the archive's .inp/.out vectors (llama.cpp's tests/test-tokenizer-0: add_special false, no special
  tokens in the texts);
- SentencePiece itself (a tokenizer.model rebuilt from the GGUF) and HF `tokenizers` with the Llama-3
  pipeline, on random text: the pre-tokenizer regex and the merges are exercised far beyond the vectors;
- transformers' LlamaTokenizer (legacy=False, as LLaVA-1.5's tokenizer) for text around special tokens
  such as "<image>": only the start of the text gets SentencePiece's "▁" prefix, not the text after a
  special token. (Known difference: transformers' converted tokenizer merges double spaces before a word
  differently from SentencePiece, "a  Y" -> "▁▁","Y" vs "▁","▁Y"; we follow SentencePiece and the vectors.)
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

import fixtures
import pyvtrim
from pyvtrim import _ffi

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:  # the C library is not built: nothing here can run
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

LLAVA_PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"
# transformers 5.23 LlamaTokenizer (legacy=False) on the Llama-2 vocabulary with <image> = 32000 added as a
# special token, plus BOS: "▁USER", ":", "▁", <image>, "<0x0A>", "What", "▁is", "▁this", "?", "▁A", "SS", ...
LLAVA_PROMPT_IDS = [1, 3148, 1001, 29901, 29871, 32000, 13, 5618, 338, 445, 29973, 319, 1799, 9047, 13566, 29901]
# The Llama-3 chat header: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>
LLAMA3_CHAT = "<|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
LLAMA3_CHAT_IDS = [128000, 128006, 882, 128007, 271, 13347, 1070, 0, 128009]


def _vocab_path(name: str) -> Path:
    try:
        return fixtures.vocab_path(name)
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def spm() -> pyvtrim.Model:
    with pyvtrim.Model(_vocab_path("ggml-vocab-llama-spm.gguf"), vocab_only=True) as m:
        yield m


@pytest.fixture(scope="module")
def bpe() -> pyvtrim.Model:
    with pyvtrim.Model(_vocab_path("ggml-vocab-llama-bpe.gguf"), vocab_only=True) as m:
        yield m


@pytest.fixture(scope="module")
def llava_vocab_path(tmp_path_factory) -> Path:
    """The Llama-2 vocabulary plus LLaVA-1.5's added tokens: <image> = 32000, <pad> = 32001 (special, so
    CONTROL, as the converter writes them)."""
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(_vocab_path("ggml-vocab-llama-spm.gguf")))
    f = r.fields
    out = tmp_path_factory.mktemp("llava-vocab") / "llava-vocab.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(list(f["tokenizer.ggml.tokens"].contents()) + ["<image>", "<pad>"])
    w.add_token_scores(list(f["tokenizer.ggml.scores"].contents()) + [0.0, 0.0])
    w.add_token_types(list(f["tokenizer.ggml.token_type"].contents()) + [3, 3])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(32001)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def llava(llava_vocab_path) -> pyvtrim.Model:
    with pyvtrim.Model(llava_vocab_path, vocab_only=True) as m:
        yield m


def _model(request, which: str) -> pyvtrim.Model:
    return request.getfixturevalue(which)


def _random_texts(n: int, seed: int) -> list:
    """Text that stresses the pre-tokenizer: every regex branch, Unicode letters/numbers/marks, odd spaces."""
    atoms = list("abcXYZ019 ,.!?'\"-_()[]{}<>|/\\@#$%^&*+=~`;:") + [
        " ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\n\n", " \n", "\u00a0", "\u3000", "\u2009", "\u200b",
        "\u200d", "'s", "'S", "'t", "'re", "'RE", "'ve", "'ll", "'LL", "'d", "'m", "'x", "Hello", " world",
        "Äpfel", "e\u0301", "нещо", "Български", "我想在", "工作", "ក", "ាន់", "🦙", "😶\u200d🌫️", "🚀", "✅",
        "١٢٣", "½", "Ⅻ", "²", "3333", "12345", "x1y2", "\x7f", "\u00ad", "\ufeff", "ſ", "İ", "ǅ", "ʰ",
        "\u0300", "ⓐ", "\x0b", "\x0c", "\x1c", "\u0085", "\u2028", "Cửa Việt",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 16))) for _ in range(n)]


# ---- the archive's test vectors -------------------------------------------------------------------


VOCABS = [("spm", "ggml-vocab-llama-spm.gguf"), ("bpe", "ggml-vocab-llama-bpe.gguf")]


@pytest.mark.parametrize("which,name", VOCABS)
def test_vectors(request, which, name):
    m = _model(request, which)
    cases = fixtures.read_vocab_tests(_vocab_path(name))
    assert len(cases) >= 40
    # vtrim_tokenize parses special tokens; the vectors hold none, so that matches llama.cpp's parse_special=false.
    assert not any("<s>" in t or "</s>" in t or "<|" in t for t, _ in cases)
    failures = [(text, got, ids) for text, ids in cases
                if (got := m.tokenize(text, add_special=False)) != ids]
    assert failures == [], f"{len(failures)} of {len(cases)} vectors differ (text, got, expected)"


@pytest.mark.parametrize("which,name", VOCABS)
def test_vectors_detokenize_to_their_text(request, which, name):
    m = _model(request, which)
    for text, ids in fixtures.read_vocab_tests(_vocab_path(name)):
        assert m.detokenize_bytes(ids, remove_leading_space=which == "spm") == text.encode("utf-8"), text


# ---- random text against the reference implementations --------------------------------------------


def test_spm_matches_sentencepiece_on_random_text(spm, spm_tokenizer_model):
    sentencepiece = pytest.importorskip("sentencepiece")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_tokenizer_model))
    texts = _random_texts(1500, seed=1)
    failures = [(t, got, exp) for t in texts
                if (got := spm.tokenize(t, add_special=False)) != (exp := sp.encode(t))]
    assert failures[:5] == [], f"{len(failures)} of {len(texts)} differ"


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _hf_llama3_tokenizer():
    """HF `tokenizers` with Llama-3's pipeline (tokenizer.json of Meta-Llama-3: Split on the regex, ByteLevel,
    BPE with ignore_merges), built from the vocabulary GGUF once and cached (reading the GGUF's 280k merges
    with gguf-py takes seconds)."""
    tk = pytest.importorskip("tokenizers")
    cached = fixtures.cache_root() / "fixtures" / "llama-bpe" / "tokenizer.json"
    if cached.is_file():
        return tk.Tokenizer.from_file(str(cached))
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(_vocab_path("ggml-vocab-llama-bpe.gguf")))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    t = tk.Tokenizer(tk.models.BPE(vocab={s: i for i, s in enumerate(tokens)}, merges=merges, ignore_merges=True))
    t.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    t.add_special_tokens([tk.AddedToken(tokens[i], special=True, normalized=False)
                          for i in range(len(tokens)) if types[i] == 3])
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    t.save(str(tmp))
    tmp.replace(cached)
    return t


def test_bpe_matches_hf_tokenizers_on_random_text(bpe):
    hf = _hf_llama3_tokenizer()
    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|reserved_special_token_5|>"]
    rng = random.Random(3)
    texts = _random_texts(1500, seed=2)
    texts += [rng.choice(specials).join(_random_texts(3, seed=i)) for i in range(300)]
    failures = [(t, got, exp) for t in texts
                if (got := bpe.tokenize(t, add_special=False)) != (exp := hf.encode(t, add_special_tokens=False).ids)]
    assert failures[:5] == [], f"{len(failures)} of {len(texts)} differ"


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_random_text_round_trips(request, which):
    m = _model(request, which)
    for text in _random_texts(500, seed=4):
        ids = m.tokenize(text, add_special=False)
        assert m.detokenize_bytes(ids, remove_leading_space=which == "spm") == text.encode("utf-8"), text


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_token_pieces_concatenate_to_the_text(request, which):
    """Streaming decodes token by token: the pieces (bytes, possibly partial characters) must add up."""
    m = _model(request, which)
    for text in _random_texts(100, seed=5):
        ids = m.tokenize(text, add_special=False)
        assert b"".join(m.detokenize_bytes([t]) for t in ids) == m.detokenize_bytes(ids)


# ---- special tokens ----------------------------------------------------------------------------------


def test_llava_prompt(llava):
    assert llava.tokenize(LLAVA_PROMPT, add_special=True) == LLAVA_PROMPT_IDS


def test_llava_prompts_match_transformers(llava, spm_tokenizer_model, tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    shutil.copy(spm_tokenizer_model, tmp_path / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(str(tmp_path))   # legacy=False, the default, as LLaVA-1.5's
    hf.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    hf.add_special_tokens({"pad_token": "<pad>"})
    assert hf.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    prompts = [
        LLAVA_PROMPT,
        "USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: And now? ASSISTANT:",
        "<image>\nUSER: Describe the image in 12345 words. ASSISTANT:",
        "USER: <image><image>\nCompare them. ASSISTANT:",
        "A chat between a curious human and an artificial intelligence assistant. USER: <image>\nHi ASSISTANT:",
        "<s>Hello</s> there <image> x<unk>y",
    ]
    for p in prompts:
        assert llava.tokenize(p, add_special=False) == hf(p, add_special_tokens=False).input_ids, p


def test_spm_text_after_a_special_token_gets_no_prefix(spm):
    assert spm.tokenize("<s>Hello</s>", add_special=False) == [1, 10994, 2]   # "Hello", not "▁Hello"
    assert spm.tokenize("Hi</s> there", add_special=False) == [6324, 2, 727]  # "▁there" from the space


def test_bpe_chat_header(bpe):
    assert bpe.tokenize(LLAMA3_CHAT, add_special=True) == LLAMA3_CHAT_IDS


def test_control_tokens_have_no_text(spm, bpe, llava):
    assert spm.detokenize([1, 15043, 2]) == " Hello"
    assert bpe.detokenize(LLAMA3_CHAT_IDS) == "user\n\nHi there!"
    assert llava.detokenize(LLAVA_PROMPT_IDS, remove_leading_space=True) == "USER: \nWhat is this? ASSISTANT:"


# ---- BOS, EOS, end of generation -----------------------------------------------------------------------


@pytest.mark.parametrize("which,bos", [("spm", 1), ("bpe", 128000)])
def test_add_special_adds_bos(request, which, bos):
    m = _model(request, which)
    assert m.info["bos_token_id"] == bos
    for text in ["Hello world", " x", "\n"]:
        assert m.tokenize(text, add_special=True) == [bos] + m.tokenize(text, add_special=False)
    assert m.tokenize("", add_special=True) == [bos]
    assert m.tokenize("", add_special=False) == []


def test_end_of_generation_tokens(spm, bpe):
    assert spm.is_eog(2) and not spm.is_eog(1) and not spm.is_eog(15043)
    assert bpe.is_eog(128001)            # <|end_of_text|>, the GGUF's EOS
    assert bpe.is_eog(128009)            # <|eot_id|>: ends an instruct turn though the GGUF does not name it
    assert not bpe.is_eog(128000) and not bpe.is_eog(128006)
    assert not spm.is_eog(-1) and not spm.is_eog(10**6)


# ---- detokenize -----------------------------------------------------------------------------------------


def test_spm_byte_tokens_give_raw_bytes(spm):
    llama = [243, 162, 169, 156]   # <0xF0> <0x9F> <0xA6> <0x99>
    assert spm.detokenize_bytes(llama) == "🦙".encode()
    assert spm.detokenize_bytes(llama[:1]) == b"\xf0"   # a partial character is passed on as it is
    assert spm.detokenize(llama[:2]) == "\ufffd"


def test_remove_leading_space(spm, bpe):
    ids = spm.tokenize("Hello", add_special=True)
    assert spm.detokenize(ids) == " Hello"
    assert spm.detokenize(ids, remove_leading_space=True) == "Hello"
    assert spm.detokenize(spm.tokenize(" Hello", add_special=False), remove_leading_space=True) == " Hello"
    # Byte-level BPE has no dummy prefix: the flag changes nothing.
    assert bpe.detokenize(bpe.tokenize(" Hello", add_special=False), remove_leading_space=True) == " Hello"


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_detokenize_rejects_ids_outside_the_vocabulary(request, which):
    m = _model(request, which)
    for bad in ([-1], [m.n_vocab], [1, 2, m.n_vocab + 5]):
        with pytest.raises(pyvtrim.VtrimValueError, match="outside the vocabulary"):
            m.detokenize(bad)


# ---- speed ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_tokenizing_is_fast(request, which):
    """A 2 KB prompt in well under a millisecond natively; the bounds leave room for slow CI machines but
    catch anything quadratic (which would take seconds on the long runs)."""
    m = _model(request, which)
    prompt = ("USER: What is on the table? There's a cat, 12345 apples and 🦙 llamas.\n" * 40)[:2048]
    best = min(_timed(m.tokenize, prompt) for _ in range(10))
    assert best < 0.02, f"{best * 1e3:.2f} ms for 2 KB"
    for run in ["a" * 20000, "!" * 20000, " " * 20000, "\n" * 20000, "7" * 20000, "<" * 20000, "🦙" * 5000]:
        assert _timed(m.tokenize, run) < 0.5, run[:3]


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


# ---- malformed vocabularies ---------------------------------------------------------------------------------


def _write_vocab(path: Path, **keys) -> Path:
    """A vocabulary-only GGUF with the given tokenizer.ggml.* keys (None: leave the key out)."""
    gguf = pytest.importorskip("gguf")
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "▁a"] + [f"<0x{b:02X}>" for b in range(256)]
    base = {
        "model": "llama", "tokens": tokens, "scores": [0.0] * len(tokens),
        "token_type": [2, 3, 3, 1, 1, 1] + [6] * 256, "bos_token_id": 1, "eos_token_id": 2,
    }
    base.update(keys)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in base.items():
        if value is None:
            continue
        name = f"tokenizer.ggml.{key}"
        if isinstance(value, str):
            w.add_string(name, value)
        elif isinstance(value, list):
            w.add_array(name, value)
        else:
            w.add_uint32(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_small_valid_vocabulary_loads(tmp_path):
    with pyvtrim.Model(_write_vocab(tmp_path / "ok.gguf"), vocab_only=True) as m:
        assert m.n_vocab == 262
        assert m.tokenize("a a", add_special=True) == [1, 5, 5]
        assert m.tokenize("b", add_special=False) == [3, 6 + ord("b")]   # "▁" then the byte fallback <0x62>


@pytest.mark.parametrize("keys,error,words", [
    ({"model": None}, pyvtrim.VtrimFormatError, "tokenizer.ggml.model"),
    ({"model": "wordpiece"}, pyvtrim.VtrimUnsupportedError, "tokenizer.ggml.model"),
    ({"tokens": None}, pyvtrim.VtrimFormatError, "tokenizer.ggml.tokens"),
    ({"tokens": [1, 2, 3]}, pyvtrim.VtrimFormatError, "tokenizer.ggml.tokens"),
    ({"scores": None}, pyvtrim.VtrimFormatError, "tokenizer.ggml.scores"),
    ({"scores": [0.0, 0.0]}, pyvtrim.VtrimFormatError, "tokenizer.ggml.scores"),
    ({"token_type": [9] * 262}, pyvtrim.VtrimFormatError, "tokenizer.ggml.token_type"),
    ({"bos_token_id": 100000}, pyvtrim.VtrimFormatError, "tokenizer.ggml.bos_token_id"),
    ({"eos_token_id": 262}, pyvtrim.VtrimFormatError, "tokenizer.ggml.eos_token_id"),
    ({"model": "gpt2", "pre": "llama-bpe"}, pyvtrim.VtrimFormatError, "tokenizer.ggml.merges"),
    ({"model": "gpt2", "pre": "qwen2", "merges": []}, pyvtrim.VtrimUnsupportedError, "tokenizer.ggml.pre"),
    ({"model": "gpt2", "merges": ["a"]}, pyvtrim.VtrimFormatError, "tokenizer.ggml.merges"),
])
def test_malformed_vocabularies_are_rejected(tmp_path, keys, error, words):
    path = _write_vocab(tmp_path / "bad.gguf", **keys)
    with pytest.raises(error, match=words.replace(".", r"\.")):
        pyvtrim.Model(path, vocab_only=True)


def test_unicode_tables_are_generated_from_the_generator():
    """core/src/vocab/unicode_tables.c is tools/gen_unicode_tables.py's output (checked where Python's Unicode
    version is the one the committed file was made from)."""
    import re
    import subprocess
    import sys
    import unicodedata

    repo = Path(__file__).resolve().parents[1]
    source = repo / "core" / "src" / "vocab" / "unicode_tables.c"
    made_from = re.search(r"Unicode ([0-9.]+)", source.read_text().splitlines()[0]).group(1)
    if unicodedata.unidata_version != made_from:
        pytest.skip(f"Python has Unicode {unicodedata.unidata_version}, the tables were made from {made_from}")
    r = subprocess.run([sys.executable, str(repo / "tools" / "gen_unicode_tables.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
