"""The sampler (core/src/runtime/sampling.c) as the C API and Model.generate expose it: parameter checks, and that
top-k, top-p and the temperature pick what they should from the model's logits. Greedy decoding and seeding
against the model are covered in test_api.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

import pyvtrim
from pyvtrim import _ffi

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:  # the C library is not built: nothing here can run
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

PROMPT = "Once upon a time, in a land far away"


def _params(**fields):
    ffi, lib = _ffi.get()[:2]
    p = ffi.new("struct vtrim_sampler_params *")
    lib.vtrim_sampler_params_default(p)
    for k, v in fields.items():
        setattr(p, k, v)
    return p


def test_default_params_are_greedy():
    p = _params()
    assert p.temperature == 0.0
    assert p.top_k == 40
    assert p.top_p == pytest.approx(0.95)
    assert p.seed == 0


@pytest.mark.parametrize("fields,words", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": -1.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -1}, "top_k"),
])
def test_init_rejects_bad_params(fields, words):
    ffi, lib = _ffi.get()[:2]
    out = ffi.new("struct vtrim_sampler **")
    assert lib.vtrim_sampler_init(_params(**fields), out) == pyvtrim.errors.ERR_INVALID_ARG
    assert out[0] == ffi.NULL
    assert words in ffi.string(lib.vtrim_last_error()).decode()


def test_init_accepts_edge_params():
    ffi, lib = _ffi.get()[:2]
    for fields in ({"top_p": 1.0}, {"top_k": 0}, {"temperature": 0.0}, {"temperature": 1e-6}, {"seed": 2**64 - 1}):
        out = ffi.new("struct vtrim_sampler **")
        assert lib.vtrim_sampler_init(_params(**fields), out) == 0, fields
        lib.vtrim_sampler_free(out[0])
    lib.vtrim_sampler_free(ffi.NULL)


def test_sampler_sample_rejects_null():
    ffi, lib = _ffi.get()[:2]
    out = ffi.new("struct vtrim_sampler **")
    assert lib.vtrim_sampler_init(_params(), out) == 0
    try:
        tok = ffi.new("int32_t *")
        assert lib.vtrim_sampler_sample(out[0], ffi.NULL, tok) == pyvtrim.errors.ERR_INVALID_ARG
    finally:
        lib.vtrim_sampler_free(out[0])


# ---- against a model's logits -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(llava_tiny):
    with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=256, kv_type="f32", n_threads=2) as m:
        yield m


@pytest.fixture(scope="module")
def prompt_and_logits(model):
    tokens = model.tokenize(PROMPT)
    return tokens, model.forward(tokens).astype(np.float64)


def _first_token(model, tokens, **kw):
    out = model.generate(tokens, max_tokens=1, **kw)
    return out[0] if out else None   # None: it drew an end-of-generation token


def _rank_order(logits):
    """Token ids best first; ties to the lower id (as the sampler breaks them)."""
    return sorted(range(len(logits)), key=lambda i: (-logits[i], i))


def test_top_k_1_and_a_tiny_top_p_are_greedy(model, prompt_and_logits):
    tokens, logits = prompt_and_logits
    best = _rank_order(logits)[0]
    if model.is_eog(best):
        pytest.skip("the random model's best next token ends the generation")
    for seed in range(5):
        assert _first_token(model, tokens, temperature=1.0, top_k=1, seed=seed) == best
        assert _first_token(model, tokens, temperature=1.0, top_k=0, top_p=1e-6, seed=seed) == best
        assert _first_token(model, tokens, temperature=1e-4, top_k=0, top_p=1.0, seed=seed) == best


def test_draws_stay_in_the_top_k(model, prompt_and_logits):
    tokens, logits = prompt_and_logits
    top5 = set(_rank_order(logits)[:5])
    for seed in range(40):
        t = _first_token(model, tokens, temperature=50.0, top_k=5, top_p=1.0, seed=seed)
        assert t is None or t in top5


def test_draws_stay_in_the_nucleus(model, prompt_and_logits):
    tokens, logits = prompt_and_logits
    order = _rank_order(logits)
    temperature, top_p = 0.5, 0.5
    z = logits / temperature
    prob = np.exp(z - z.max())
    prob /= prob.sum()
    cum = np.cumsum(prob[order])
    nucleus = set(order[: int(np.searchsorted(cum, top_p)) + 1])
    for seed in range(40):
        t = _first_token(model, tokens, temperature=temperature, top_k=0, top_p=top_p, seed=seed)
        assert t is None or t in nucleus


def test_draw_frequencies_follow_the_softmax(model, prompt_and_logits):
    """Between the two best tokens at temperature T, the best is drawn with probability
    1 / (1 + exp(-(l0 - l1) / T)); 300 seeds put the count within 4.5 binomial sigmas of that."""
    tokens, logits = prompt_and_logits
    a, b = _rank_order(logits)[:2]
    if model.is_eog(a) or model.is_eog(b):
        pytest.skip("an end-of-generation token is among the two best")
    temperature = max(float(logits[a] - logits[b]), 0.05)   # keeps p away from 0 and 1
    p = 1.0 / (1.0 + math.exp(-(logits[a] - logits[b]) / temperature))
    n = 300
    draws = [_first_token(model, tokens, temperature=temperature, top_k=2, top_p=1.0, seed=s) for s in range(n)]
    assert set(draws) <= {a, b}
    count = draws.count(a)
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 4.5 * sigma, (count, n * p)
