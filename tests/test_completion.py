"""create_chat_completion: OpenAI-style messages rendered as the HF chat templates render them, prompt-prefix
reuse that gives a fresh prefill's logits (and is reported in usage), the reuse rule under a reduction, stop
strings, streams equal to non-streamed answers, and clear errors for bad messages."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

import pyvtrim
from pyvtrim import _ffi, completion, messages as msgs

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

IMAGE = np.random.default_rng(7).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes(IMAGE)
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def user(text, image=True):
    parts = [{"type": "image_url", "image_url": {"url": DATA_URL}}] if image else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def hf_form(messages, keep_strings=False):
    """The same conversation as HF processors take it ({"type": "image"} parts)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str) and keep_strings:
            out.append(dict(m))
            continue
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({"role": m["role"], "content": [{"type": "image"} if p["type"] == "image_url" else p
                                                   for p in content]})
    return out


CONVERSATIONS = [
    [user("What is it?")],
    [{"role": "system", "content": "You are terse."}, user("What is it?")],
    [user("What is it?"), {"role": "assistant", "content": "A cat."}, user("And the colour?", image=False)],
    [{"role": "user", "content": "Hello there"}],
]


@pytest.fixture(scope="module")
def model(llava_tiny):
    m = pyvtrim.Model(llava_tiny.gguf, n_ctx=1024, n_threads=1, kv_type="f32")
    yield m
    m.close()


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_llava_prompt_is_the_hf_processors(llava_tiny, i) -> None:
    transformers = pytest.importorskip("transformers")
    proc = transformers.AutoProcessor.from_pretrained(llava_tiny.hf_dir)
    conv = CONVERSATIONS[i]
    expected = proc.apply_chat_template(hf_form(conv), add_generation_prompt=True, tokenize=False)
    text, has_bos, images = msgs.conversation("llava", conv)
    assert text == expected and not has_bos
    assert images == [PNG] * sum(1 for m in conv for p in m["content"] if isinstance(p, dict)
                                 and p["type"] == "image_url")


MLLAMA_CASES = [
    [user("What is it?")],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": " Hi "}],
    [{"role": "user", "content": [{"type": "text", "text": " Hi "}]}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": [{"type": "text", "text": "Bye"}]}],
    [user("What is it?"), {"role": "assistant", "content": "A cat."}, user("And this?")],
]


@pytest.mark.parametrize("i", range(len(MLLAMA_CASES)))
def test_mllama_prompt_is_the_templates(i) -> None:
    jinja2 = pytest.importorskip("jinja2.sandbox")
    from pyvtrim.conversion.mllama import MLLAMA_CHAT_TEMPLATE

    def fail(message):
        raise ValueError(message)

    env = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    conv = MLLAMA_CASES[i]
    expected = env.from_string(MLLAMA_CHAT_TEMPLATE).render(
        messages=hf_form(conv, keep_strings=True), add_generation_prompt=True, bos_token="<|begin_of_text|>", raise_exception=fail)
    text, has_bos, _ = msgs.conversation("mllama", conv)
    assert text == expected and has_bos


def test_mllama_system_message_with_an_image_is_refused() -> None:
    with pytest.raises(ValueError, match="system message with images"):
        msgs.conversation("mllama", [{"role": "system", "content": "Be brief."}, user("What is it?")])


def test_prefix_reuse_gives_the_fresh_logits_and_is_counted(model) -> None:
    a, b = model.session(), model.session()
    first = a.create_chat_completion([user("What is it?")], max_tokens=6)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    reply = first["choices"][0]["message"]["content"]
    conv = [user("What is it?"), {"role": "assistant", "content": reply}, user("And the colour?", image=False)]
    counts = completion.prepare(a, conv, None)
    n_image = int(model.info["n_image_tokens"])
    assert counts["n_cached"] > n_image          # the turn with the image was not prefilled again
    assert a.last_stats["n_images"] == 0 and a.last_stats["t_encode_ms"] == 0
    reused = a.logits()
    fresh = completion.prepare(b, conv, None)
    assert fresh["n_cached"] == 0 and fresh["n_prompt"] == counts["n_prompt"]
    # the same math on the same KV (f32); only the split of the prompt into prefill calls differs
    np.testing.assert_allclose(reused, b.logits(), rtol=1e-4, atol=1e-4)
    again = a.create_chat_completion(conv, max_tokens=4)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == counts["n_prompt"] - 1
    a.close()
    b.close()


def test_a_different_image_is_not_reused(model) -> None:
    s = model.session()
    s.create_chat_completion([user("What is it?")], max_tokens=2)
    other = "data:image/png;base64," + base64.b64encode(png_bytes(255 - IMAGE)).decode()
    conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": other}},
                                         {"type": "text", "text": "What is it?"}]}]
    counts = completion.prepare(s, conv, None)
    n_before_image = len(model.tokenize("USER: "))   # BOS and the role prefix
    assert counts["n_cached"] == n_before_image
    s.close()


def test_with_a_reduction_only_the_part_before_the_image_is_reused(model) -> None:
    """FastV ranks the image by the whole prompt's last token: a reduced cache of another prompt is never
    reused, and the result equals a fresh reduced prefill."""
    fastv = {"method": "fastv", "k": 1, "ratio": 0.5}
    a, b = model.session(), model.session()
    sys_msg = {"role": "system", "content": "You look at pictures and answer in one word."}
    first = a.create_chat_completion([sys_msg, user("What is it?")], max_tokens=4, reduce=[fastv])
    assert first["usage"]["pyvtrim"]["stages"][0]["n_kept"] < first["usage"]["pyvtrim"]["n_image_tokens"]
    conv = [sys_msg, user("What is it?"), {"role": "assistant", "content": "x"}, user("Sure?", image=False)]
    counts = completion.prepare(a, conv, [fastv])
    before_image = len(model.tokenize(sys_msg["content"] + " USER: "))
    assert 0 < counts["n_cached"] <= before_image
    completion.prepare(b, conv, [fastv])
    np.testing.assert_allclose(a.logits(), b.logits(), rtol=1e-4, atol=1e-4)
    # and a request without the reduction does not reuse the reduced image rows either
    counts = completion.prepare(a, conv, None)
    assert counts["n_cached"] <= before_image + 1
    a.close()
    b.close()


def test_stream_equals_the_answer_and_ends_with_usage(model) -> None:
    s = model.session()
    kw = dict(max_tokens=12, temperature=0.8, seed=5)
    whole = s.create_chat_completion([user("What is it?")], **kw)
    chunks = list(s.create_chat_completion([user("What is it?")], stream=True, **kw))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"] <= 12
    assert model.chat(messages=[user("What is it?")], **kw) == text
    s.close()


def test_stop_strings_cut_the_reply(model) -> None:
    s = model.session()
    full = s.create_chat_completion([user("What is it?")], max_tokens=16)["choices"][0]["message"]["content"]
    assert len(full) > 4
    stop = full[2:4]
    cut = s.create_chat_completion([user("What is it?")], max_tokens=16, stop=[stop, "\x00never"])
    assert cut["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in
                       s.create_chat_completion([user("What is it?")], max_tokens=16, stop=stop, stream=True))
    assert streamed == full[:full.index(stop)]
    s.close()


def test_stop_filter_holds_back_a_partial_stop() -> None:
    f = completion._StopFilter(["END"])
    assert f.feed("abcE") == "abc"
    assert f.feed("N") == ""
    assert f.feed("x") == "ENx"
    assert f.feed("yEND tail") == "y" and f.hit


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty"),
    ([{"role": "tool", "content": "x"}], "role must be"),
    ([{"role": "user", "content": 3}], "content must be"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported content part"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
     "not valid base64"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}], "remote"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}], "last message"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": DATA_URL}}]},
      {"role": "user", "content": "x"}], "only user messages"),
])
def test_bad_messages_raise_value_errors(model, bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        model.create_chat_completion(bad, max_tokens=1)


def test_corrupt_image_missing_file_and_oversized_prompt(model, tmp_path) -> None:
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG not really").decode()
    with pytest.raises(pyvtrim.VtrimImageError):
        model.create_chat_completion([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": corrupt}}, {"type": "text", "text": "x"}]}])
    with pytest.raises(FileNotFoundError):
        model.create_chat_completion([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(tmp_path / "none.png")}}]}])
    (tmp_path / "a.png").write_bytes(PNG)
    ok = model.create_chat_completion([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(tmp_path / "a.png")}}, {"type": "text", "text": "x"}]}],
        max_tokens=2)
    assert ok["usage"]["pyvtrim"]["n_images"] == 1
    with pytest.raises(pyvtrim.VtrimContextFullError):
        model.create_chat_completion([{"role": "user", "content": "word " * 1200}], max_tokens=1)
    # and the session still answers
    assert model.create_chat_completion([user("What is it?")], max_tokens=2)["usage"]["completion_tokens"] <= 2


@pytest.fixture(scope="module")
def mllama_model(mllama_tiny):
    with pyvtrim.Model(str(mllama_tiny.gguf), n_ctx=512, kv_type="f32", n_threads=1) as m:
        yield m


def other_image_url() -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(255 - IMAGE)).decode()


def test_mllama_follow_up_reuses_the_conversation(mllama_model) -> None:
    """Llama-3.2-Vision keeps its image in the cross-attention cache: a text follow-up keeps the held
    conversation (no encode, only the new tokens prefilled) and gives a fresh prefill's logits."""
    m = mllama_model
    s, fresh = m.session(), m.session()
    first = s.create_chat_completion([user("What is it?")], max_tokens=4)
    assert first["usage"]["pyvtrim"]["n_images"] == 1
    conv = [user("What is it?"), {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And then?"}]
    counts = completion.prepare(s, conv, None)
    assert counts["n_cached"] > 0
    assert s.last_stats["n_images"] == 0 and s.last_stats["t_encode_ms"] == 0
    reused = s.logits()
    assert completion.prepare(fresh, conv, None)["n_cached"] == 0
    # the same math on the same caches (f32); only the split of the prompt into prefill calls differs
    np.testing.assert_allclose(reused, fresh.logits(), rtol=1e-4, atol=1e-4)
    again = s.create_chat_completion(conv, max_tokens=4)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == counts["n_prompt"] - 1
    assert again["choices"] == fresh.create_chat_completion(conv, max_tokens=4)["choices"]
    s.close()
    fresh.close()


def test_mllama_new_image_in_a_later_turn(mllama_tiny, mllama_model) -> None:
    """An image in a later turn: a fresh prefill of the whole conversation (HF's rows before the first image
    attend to every image), the first image taken from the image cache, the second encoded; the logits equal
    a model without the cache (the cached tower output is the tower's output, bit for bit)."""
    conv = [user("What is it?"), {"role": "assistant", "content": "A square."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": other_image_url()}},
                                         {"type": "text", "text": "And this one?"}]}]
    s = mllama_model.session()
    s.create_chat_completion([user("What is it?")], max_tokens=2)
    counts = completion.prepare(s, conv, None)
    assert counts["n_cached"] == 0
    assert s.last_stats["n_images"] == 2 and s.last_stats["n_images_cached"] >= 1
    with pyvtrim.Model(str(mllama_tiny.gguf), n_ctx=512, kv_type="f32", n_threads=1, image_cache_mib=0) as plain:
        p = plain.session()
        completion.prepare(p, conv, None)
        assert p.last_stats["n_images_cached"] == 0
        np.testing.assert_array_equal(s.logits(), p.logits())
        p.close()
    s.close()


def test_mllama_truncation_keeps_the_image_token(mllama_model) -> None:
    """vtrim_context_truncate on Llama-3.2-Vision: rows after the image's token may go, the image's may not."""
    s = mllama_model.session()
    completion.prepare(s, [user("What is it?")], None)
    tokens = s._held.tokens
    image_at = tokens.index(s.image_token_id)
    with pytest.raises(pyvtrim.VtrimUnsupportedError, match="image token"):
        s._truncate(image_at)
    s._truncate(image_at + 1)
    s._prefill(tokens[image_at + 1:], [])
    kept = s.logits()
    s._reset()
    s._prefill(tokens, [IMAGE])
    np.testing.assert_allclose(kept, s.logits(), rtol=1e-4, atol=1e-4)
    s.close()


def test_mllama_system_message_with_an_image_is_refused_by_the_session(mllama_model) -> None:
    s = mllama_model.session()
    with pytest.raises(ValueError, match="system message"):
        s.create_chat_completion([{"role": "system", "content": "Be brief."}, user("What is it?")])
    s.close()
