"""Sessions on one Model: concurrent generation from threads equals running the sessions one after another,
the default session keeps Model.chat/generate working, close() reaches every session, and cancellation
(the C abort flag and callback, Session.cancel) stops a call and leaves the session usable."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import pyvtrim
from pyvtrim import _ffi, errors

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

IMAGE = np.random.default_rng(7).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
IMAGE2 = np.random.default_rng(8).integers(0, 256, size=(56, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model(llava_tiny):
    m = pyvtrim.Model(llava_tiny.gguf, n_ctx=1024, n_threads=1)
    yield m
    m.close()


def _jobs(m):
    """(session kwargs, call) pairs: greedy and seeded sampling, with and without images and FastV."""
    p1 = m.tokenize(m.chat_prompt("What is it?", 1))
    p2 = m.tokenize(m.chat_prompt("Describe the picture in detail.", 1))
    p3 = m.tokenize(m.chat_prompt("Say something.", 0))
    return [
        lambda s: s.generate(p1, [IMAGE], max_tokens=16),
        lambda s: s.generate(p2, [IMAGE2], max_tokens=16, temperature=0.9, seed=11),
        lambda s: s.generate(p3, [], max_tokens=16, temperature=0.7, top_k=0, top_p=0.9, seed=3),
        lambda s: s.generate(p1, [IMAGE2], max_tokens=16, reduce=pyvtrim.FastV(k=1, ratio=0.5)),
    ]


def test_sessions_in_threads_equal_sequential_runs(model) -> None:
    jobs = _jobs(model)
    sessions = [model.session(n_ctx=512) for _ in jobs]
    expected = [job(s) for job, s in zip(jobs, sessions)]
    assert len({tuple(e) for e in expected}) > 1   # different jobs: a mix-up between sessions would show
    results = [[None] * 3 for _ in jobs]
    errs = []

    def worker(i):
        try:
            for r in range(3):
                results[i][r] = jobs[i](sessions[i])
        except BaseException as e:  # reported below
            errs.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    default = [model.chat(IMAGE, "What is it?", max_tokens=8) for _ in range(2)]  # the default session too
    for t in threads:
        t.join()
    assert not errs, errs
    for i, e in enumerate(expected):
        assert results[i] == [e] * 3, i
    assert default[0] == default[1]
    for s in sessions:
        s.close()


def test_a_session_has_its_own_sequence(model) -> None:
    a, b = model.session(), model.session(n_ctx=256, kv_type="f32")
    assert (a.n_ctx, b.n_ctx, b.kv_type) == (1024, 256, "f32")
    toks = model.tokenize(model.chat_prompt("What is it?", 1))
    la = a.forward(toks, [IMAGE])
    lb = b.forward(toks[:5])
    assert a.last_stats["n_past"] > b.last_stats["n_past"] == 5
    np.testing.assert_allclose(a.logits(), la)
    np.testing.assert_allclose(b.logits(), lb)
    a.close()
    with pytest.raises(pyvtrim.VtrimClosedError):
        a.logits()
    assert b.logits().shape == la.shape
    b.close()


def test_model_close_closes_its_sessions(llava_tiny) -> None:
    m = pyvtrim.Model(llava_tiny.gguf, n_ctx=256, n_threads=1)
    s = m.session()
    s.forward(m.tokenize("hello"))
    m.close()
    assert s.closed
    with pytest.raises(pyvtrim.VtrimClosedError):
        s.forward([1, 2])
    with pytest.raises(pyvtrim.VtrimClosedError):
        m.session()


def _c(s):
    ffi, lib = _ffi.get()[:2]
    return ffi, lib, s._ctx()


def test_abort_flag_fails_a_prefill_and_leaves_the_sequence(model) -> None:
    s = model.session(n_ctx=512, kv_type="f32")
    ffi, lib, ctx = _c(s)
    toks = model.tokenize(model.chat_prompt("What is it?", 1))
    s.forward(toks, [IMAGE])
    n_past = s.last_stats["n_past"]
    follow = model.tokenize(" And the colour?", add_special=False)
    arr = np.asarray(follow, dtype=np.int32)
    lib.vtrim_context_abort(ctx, True)
    assert lib.vtrim_prefill(ctx, ffi.from_buffer("int32_t[]", arr), arr.size, ffi.NULL, 0) == errors.ERR_ABORTED
    assert lib.vtrim_decode(ctx, int(follow[0])) == errors.ERR_ABORTED
    assert s.last_stats["n_past"] == n_past
    lib.vtrim_context_abort(ctx, False)
    got = s.prefill(follow)
    fresh = model.session(n_ctx=512, kv_type="f32")
    # one prefill of everything vs two: the matmuls split the rows differently (float rounding only)
    np.testing.assert_allclose(got, fresh.forward(toks + follow, [IMAGE]), rtol=1e-4, atol=1e-4)
    s.close()
    fresh.close()


def test_abort_callback_stops_a_prefill_mid_graph(model) -> None:
    """The CPU backend asks the callback between graph nodes: a prefill stops inside its graph."""
    s = model.session(n_ctx=512, kv_type="f32")
    ffi, lib, ctx = _c(s)
    calls = [0]

    @ffi.callback("bool(void *)")
    def stop_after_some(_data):
        calls[0] += 1
        return calls[0] > 3

    toks = model.tokenize(model.chat_prompt("What is it?", 1))
    lib.vtrim_context_set_abort_callback(ctx, stop_after_some, ffi.NULL)
    with pytest.raises(pyvtrim.VtrimAbortedError):
        s.forward(toks, [IMAGE])
    assert calls[0] > 3 and s.last_stats["n_past"] == 0
    lib.vtrim_context_set_abort_callback(ctx, ffi.NULL, ffi.NULL)
    fresh = model.session(n_ctx=512, kv_type="f32")
    np.testing.assert_array_equal(s.forward(toks, [IMAGE]), fresh.forward(toks, [IMAGE]))
    s.close()
    fresh.close()


def test_cancel_ends_a_generation_and_the_session_goes_on(model) -> None:
    s = model.session(n_ctx=512)
    toks = model.tokenize(model.chat_prompt("What is it?", 1))
    expected = s.generate(toks, [IMAGE], max_tokens=20)
    pieces = s.chat(IMAGE, "What is it?", max_tokens=200, stream=True)
    next(pieces)
    t = threading.Thread(target=s.cancel)
    t.start()
    t.join()
    rest = list(pieces)   # ends at the next token
    assert len(rest) <= 1 and s.last_stats["finish_reason"] == "cancelled"
    assert s.generate(toks, [IMAGE], max_tokens=20) == expected
    s.close()


def test_a_chat_on_a_session_equals_one_on_the_default_session(model) -> None:
    s = model.session()
    chat, ref = s.start_chat(max_tokens=6), model.start_chat(max_tokens=6)
    got = [chat.ask("What is it?", image=IMAGE), chat.ask("And the colour?")]
    assert got == [ref.ask("What is it?", image=IMAGE), ref.ask("And the colour?")]
    s.close()
