"""The image-embedding cache a model's sessions share (runtime/image_cache.c): an image any session encoded is
taken from the cache by the next, with bit-identical logits; bounded, least recently used out first; not
used with an encoder reduction (FiCoCo-V), whose rows depend on its parameters."""

from __future__ import annotations

import numpy as np
import pytest

import pyvtrim


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)




@pytest.fixture()
def model(llava_tiny):
    with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=512, kv_type="f32", n_threads=2) as m:
        yield m


def test_a_second_session_takes_the_image_from_the_cache(model):
    ids = model.tokenize(model.chat_prompt("What is in this picture?", 1))
    a, b = model.session(), model.session()
    la = a.forward(ids, [_image(1)])
    assert a.last_stats["n_images_cached"] == 0
    lb = b.forward(ids, [_image(1)])
    assert b.last_stats["n_images_cached"] == 1
    assert np.array_equal(la, lb)
    b.forward(ids, [_image(2)])                      # another image: encoded
    assert b.last_stats["n_images_cached"] == 0
    assert model.memory()["image_cache"] >= 2 * model.info["n_image_tokens"] * model.info["n_embd"] * 4


def test_two_images_in_one_prompt_one_seen(model):
    ids = model.tokenize(model.chat_prompt("Compare them.", 2))
    model.forward(model.tokenize(model.chat_prompt("What is it?", 1)), [_image(3)])
    model.forward(ids, [_image(4), _image(3)])
    assert model.last_stats["n_images_cached"] == 1


def test_least_recently_used_goes_first(llava_tiny):
    probe = pyvtrim.Model(str(llava_tiny.gguf), n_ctx=512, n_threads=2)
    per_image = probe.info["n_image_tokens"] * (probe.info["n_embd"] * 4 + 4)
    probe.close()
    # room for two images
    with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=512, n_threads=2, image_cache_mib=2.5 * per_image / 2**20) as m:
        ids = m.tokenize(m.chat_prompt("What is it?", 1))
        seen = []
        for seed in (1, 2, 1, 3, 2, 1):   # 3 evicts 2 (1 was used later); then 2 evicts 1 (3 was used later)
            m.forward(ids, [_image(seed)])
            seen.append(m.last_stats["n_images_cached"])
        assert seen == [0, 0, 1, 0, 0, 0]


def test_off_and_with_an_encoder_reduction(llava_tiny):
    with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=512, n_threads=2, image_cache_mib=0) as m:
        ids = m.tokenize(m.chat_prompt("What is it?", 1))
        m.forward(ids, [_image(5)])
        m.forward(ids, [_image(5)])
        assert m.last_stats["n_images_cached"] == 0 and m.memory()["image_cache"] == 0
    with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=512, kv_type="f32", n_threads=2) as m:
        ids = m.tokenize(m.chat_prompt("What is it?", 1))
        m.forward(ids, [_image(6)])
        ficoco = pyvtrim.FiCoCoV(tokens=8, start_layer=0)
        want = m.forward(ids, [_image(6)], reduce=ficoco)
        assert m.last_stats["n_images_cached"] == 0     # FiCoCo-V's rows are its own: encoded
        got = m.forward(ids, [_image(6)])
        assert m.last_stats["n_images_cached"] == 1     # the unreduced rows are still there
        assert not np.array_equal(got, want)


def test_bad_size_raises(llava_tiny):
    with pytest.raises(pyvtrim.VtrimValueError, match="image_cache_mib"):
        pyvtrim.Model(str(llava_tiny.gguf), image_cache_mib=-1)
