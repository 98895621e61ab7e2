"""Trimmed Llama (pyvtrim.TrimCrossAttn) against the PyTorch reference in trim_reference.py, on the tiny
Llama-3.2-Vision fixtures (tests/fixtures_mllama.py, tests/conftest.py).

The reference itself is checked first against transformers (no runtime needed): run layer by layer with nothing
trimmed it gives transformers' logits (1e-4; measured ~5e-6) and greedy tokens. Then the runtime:

* kept state rows, compared as sets: the reference gives the rows that stay kept under any perturbation of the
  scores below SCORE_TOL (must) and those that could be kept under one (may); the runtime's set lies between
  them, and equals the reference's when no score is that close to a cut. Scores are probabilities of order
  1/n_states (0.01-0.2 here); f32 in a different summation order moves them by ~1e-7.
* last logits: f32 GGUF, f32 caches: within 1e-3 absolute (logit std ~1.5-2, as the parity tests), against
  the reference run with the runtime's kept set (the same set unless a near-tie was met).
* 16 greedy tokens: equal, except that the sequences may part at a step where the reference's best two logits
  are closer than 2 * LOGIT_TOL (a tie within the logit tolerance); the test then stops comparing there.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import pyvtrim  # noqa: E402

import fixtures_mllama as fm  # noqa: E402
import mllama_reference as mr  # noqa: E402
from trim_reference import Trim, TrimReference, kv_bytes, make_inputs, n_keep  # noqa: E402

FIXTURES = ["mllama_tiny", "mllama_tiny_b"]
K_RATIOS = [0.1, 0.25, 0.5]
MODES = ["union", "budget"]
CASES = ["one_tile", "tiles", "two_images", "image_late"]
REF_TOL = 1e-4      # the reference against transformers, both float32 torch
LOGIT_TOL = 1e-3    # the runtime against the reference
SCORE_TOL = 1e-5    # near-tie margin of the selection scores
N_NEW = 16


def _trim_params(k_ratio: float, mode: str, trim_first_layer: bool = False) -> dict:
    """TrimCrossAttn's keyword arguments: budget mode keeps the fraction k_ratio by the head-mean score."""
    if mode == "budget":
        return dict(mode="budget", keep=k_ratio, trim_first_layer=trim_first_layer)
    return dict(k_ratio=k_ratio, mode="union", trim_first_layer=trim_first_layer)


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=FIXTURES)
def tiny(request):
    try:
        return request.getfixturevalue(request.param)
    except pytest.FixtureLookupError:
        pytest.skip(f"fixture {request.param} is not defined (tests/conftest.py)")


@pytest.fixture(scope="module")
def hf(tiny):
    model = mr.load_model(tiny.hf_dir)
    proc = mr.load_image_processor(tiny.hf_dir)
    return model, proc, TrimReference(model)


@pytest.fixture(scope="module")
def runtime(tiny):
    from pyvtrim import _ffi

    try:
        _ffi.get()
    except pyvtrim.VtrimLibraryError as e:
        pytest.skip(f"libvtrim not available: {e}")
    if not hasattr(pyvtrim, "TrimCrossAttn"):
        pytest.skip("pyvtrim.TrimCrossAttn is not implemented yet")
    with pyvtrim.Model(str(tiny.gguf), n_ctx=512, kv_type="f32", n_threads=2) as m:
        yield m


def _case(tiny, proc, name: str):
    """(token ids, PIL images, tiles wanted): prompts in the chat format, images sized for 1 or more tiles."""
    s = proc.size["height"]
    tok = tiny.hf_dir / "tokenizer.json"
    if name == "one_tile":
        return fm.prompt_ids(tok, "What is in this picture?", 1), [mr.test_image(s, s, 11)], [1]
    if name == "tiles":
        return fm.prompt_ids(tok, "Describe the scene.", 1), [mr.test_image(3 * s, s + 5, 12)], None
    if name == "two_images":
        return (fm.prompt_ids(tok, "Which one is brighter?", 2),
                [mr.test_image(s, 2 * s, 13), mr.test_image(s - 3, s, 14)], None)
    if name == "image_late":  # the question comes first: those rows see no image
        return (fm.prompt_ids(tok, "Count the objects", 1, image_first=False),
                [mr.test_image(s, 2 * s - 7, 15)], None)
    raise KeyError(name)


def _inputs(tiny, proc, name: str):
    ids, images, tiles = _case(tiny, proc, name)
    inp = make_inputs(proc, ids, images, fm.IMAGE_TOKEN_ID)
    if tiles is not None:
        assert inp.n_tiles == tiles
    elif name != "two_images":
        assert max(inp.n_tiles) > 1, inp.n_tiles  # the case must exercise several tiles (and padding ones)
    return ids, [np.asarray(im) for im in images], inp


def _hf_logits(model, inp) -> torch.Tensor:
    with torch.no_grad():
        return model(**inp.hf_kwargs()).logits[0, -1].float()


def _text_config(model):
    return model.config.text_config


# ---- the reference against transformers (no runtime) ---------------------------------------------


@pytest.mark.parametrize("case", CASES + ["text_only"])
def test_reference_without_trimming_is_transformers(tiny, hf, case):
    model, proc, ref = hf
    if case == "text_only":
        ids = fm.prompt_ids(tiny.hf_dir / "tokenizer.json", "Tell me a story.", 0)
        inp = make_inputs(proc, ids, [], fm.IMAGE_TOKEN_ID)
    else:
        ids, _, inp = _inputs(tiny, proc, case)
    want = _hf_logits(model, inp)
    got = ref.run(inp).logits
    assert float((got - want).abs().max()) <= REF_TOL


def test_reference_greedy_without_trimming_is_transformers(tiny, hf):
    model, proc, ref = hf
    ids, pil_images, _ = _case(tiny, proc, "tiles")
    want = mr.run_hf(model, ids, pil_images, image_processor=proc, n_decode=N_NEW)
    got, _, _ = ref.greedy(make_inputs(proc, ids, pil_images, fm.IMAGE_TOKEN_ID), None, N_NEW)
    assert got == want.tokens


@pytest.mark.parametrize("trim_first_layer", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_reference_keeping_everything_is_transformers(tiny, hf, mode, trim_first_layer):
    """k_ratio = keep = 1.0 keeps every real-tile row. With the image first (no row blind to images) or no
    padding tile, that is HF's computation."""
    model, proc, ref = hf
    tok = tiny.hf_dir / "tokenizer.json"
    s = proc.size["height"]
    image_first = [fm.IMAGE_TOKEN_ID] + fm.encode(tok, "What is this?")
    chat = fm.prompt_ids(tok, "What is this?", 1)
    n_max = int(model.config.vision_config.max_num_tiles)
    for ids, img in [(image_first, mr.test_image(3 * s, s, 21)), (chat, mr.test_image(2 * s, 2 * s, 22))]:
        inp = make_inputs(proc, ids, [img], fm.IMAGE_TOKEN_ID)
        if ids is chat:
            assert inp.n_tiles == [n_max]
        trim = Trim(**dict(_trim_params(1.0, mode, trim_first_layer)))
        r = ref.run(inp, trim)
        assert r.kept == sorted(j for rows in ref.candidates(inp) for j in rows)
        assert float((r.logits - _hf_logits(model, inp)).abs().max()) <= REF_TOL


@pytest.mark.parametrize("case", CASES)
def test_reference_selection_rules(tiny, hf, case):
    model, proc, ref = hf
    _, _, inp = _inputs(tiny, proc, case)
    n_head = _text_config(model).num_attention_heads
    cands = ref.candidates(inp)
    union_prev = set()
    for k_ratio in K_RATIOS:
        u = ref.run(inp, Trim(k_ratio=k_ratio)).selection
        b = ref.run(inp, Trim(mode="budget", keep=k_ratio)).selection
        assert u.layer == b.layer == _text_config(model).cross_attention_layers[0]
        for sel in (u, b):
            assert sel.kept == sorted(set(sel.kept))
            assert sel.n_in == sum(map(len, cands))
        for rows, (n_u, kept_u), (n_b, kept_b) in zip(cands, u.per_image, b.per_image):
            k = n_keep(k_ratio, len(rows))
            assert n_u == n_b == len(rows)
            assert k <= kept_u <= min(len(rows), n_head * k)       # a union of n_head top-k sets
            assert kept_b == k
            assert len(set(u.kept) & set(rows)) == kept_u and len(set(b.kept) & set(rows)) == kept_b
        assert set(u.kept) <= {j for rows in cands for j in rows}   # never a padding-tile row
        assert union_prev <= set(u.kept)                           # nested top-k per head
        union_prev = set(u.kept)


def test_n_keep_rounding():
    assert n_keep(0.1, 5) == 1 and n_keep(0.1, 30) == 3 and n_keep(0.29, 100) == 29
    assert n_keep(0.25, 17) == 4 and n_keep(1.0, 68) == 68 and n_keep(0.5, 0) == 0


# ---- the runtime against the reference -------------------------------------------------------------


def _check_kept(sel, got: list) -> None:
    must, may = sel.bounds(SCORE_TOL)
    got_set = set(got)
    assert got == sorted(got_set), "last_kept_image_rows() must be ascending, without repeats"
    assert must <= got_set <= may, (sorted(must - got_set), sorted(got_set - may))
    if must == may:
        assert got_set == set(sel.kept)


def _check_stats(m, model, sel, kept: list, trim_first_layer: bool) -> None:
    cfg = _text_config(model)
    st = m.last_stats
    trims = [s for s in st["stages"] if s["method"] == "trim"]
    assert len(trims) == 1, st["stages"]
    stage = trims[0]
    assert stage["hook"] == "cross_attn"
    assert stage["layer"] == cfg.cross_attention_layers[0]
    assert stage["n_in"] == sel.n_in == st["n_image_tokens"]
    assert stage["n_kept"] == len(kept) == st["n_image_tokens_kept"]
    n_cross = len(cfg.cross_attention_layers)
    n_embd_kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    full, held = kv_bytes(n_cross, sel.n_states, len(kept), n_embd_kv, 4, trim_first_layer)
    assert (stage["kv_bytes_full"], stage["kv_bytes_kept"]) == (full, held)
    # The cache holds what the stage says: self-attention rows of the sequence plus the trimmed cross caches.
    n_self = cfg.num_hidden_layers - n_cross
    assert st["kv_cache_bytes"] == n_self * st["n_past"] * 2 * n_embd_kv * 4 + held


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k_ratio", K_RATIOS)
@pytest.mark.parametrize("case", CASES)
def test_trim_logits_kept_set_and_stats(runtime, hf, tiny, case, k_ratio, mode):
    m = runtime
    model, proc, ref = hf
    ids, images, inp = _inputs(tiny, proc, case)
    trim = Trim(**_trim_params(k_ratio, mode))
    want = ref.run(inp, trim)
    sel = want.selection
    got = m.forward(ids, images, reduce=pyvtrim.TrimCrossAttn(**_trim_params(k_ratio, mode)))
    kept = m.last_kept_image_rows()
    _check_kept(sel, kept)
    if set(kept) != set(sel.kept):  # a near-tie went the other way: compare with that selection
        want = ref.run(inp, trim, kept=kept)
    diff = float(np.max(np.abs(got - want.logits.numpy())))
    assert diff <= LOGIT_TOL, diff
    _check_stats(m, model, sel, kept, False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["tiles", "two_images", "image_late"])
def test_trim_first_layer(runtime, hf, tiny, case, mode):
    m = runtime
    model, proc, ref = hf
    ids, images, inp = _inputs(tiny, proc, case)
    params = _trim_params(0.25, mode, trim_first_layer=True)
    want = ref.run(inp, Trim(**params))
    got = m.forward(ids, images, reduce=pyvtrim.TrimCrossAttn(**params))
    kept = m.last_kept_image_rows()
    _check_kept(want.selection, kept)
    sel = want.selection
    if set(kept) != set(want.kept):
        want = ref.run(inp, Trim(**params), kept=kept)
    assert float(np.max(np.abs(got - want.logits.numpy()))) <= LOGIT_TOL
    _check_stats(m, model, sel, kept, True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k_ratio", K_RATIOS)
@pytest.mark.parametrize("case", ["one_tile", "tiles", "two_images"])
def test_trim_greedy_16(runtime, hf, tiny, case, k_ratio, mode):
    m = runtime
    model, proc, ref = hf
    ids, images, inp = _inputs(tiny, proc, case)
    params = _trim_params(k_ratio, mode)
    got = m.generate(ids, images, max_tokens=N_NEW, reduce=pyvtrim.TrimCrossAttn(**params))
    kept = m.last_kept_image_rows()
    want, margins, sel = ref.greedy(inp, Trim(**params), N_NEW)
    _check_kept(sel, kept)
    if set(kept) != set(sel.kept):
        want, margins, _ = ref.greedy(inp, Trim(**params), N_NEW, kept=kept)
    assert len(got) >= N_NEW // 2  # an end-of-generation token this early would make the test weak
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            assert margins[i] < 2 * LOGIT_TOL, (i, got, want, margins[i])
            break
    # Decoding appended to the self-attention caches only: the cross caches stayed trimmed.
    st = m.last_stats
    cfg = _text_config(model)
    n_cross = len(cfg.cross_attention_layers)
    n_embd_kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    _, held = kv_bytes(n_cross, sel.n_states, len(kept), n_embd_kv, 4, False)
    assert st["kv_cache_bytes"] == (cfg.num_hidden_layers - n_cross) * st["n_past"] * 2 * n_embd_kv * 4 + held


@pytest.mark.parametrize("mode", MODES)
def test_keeping_everything(runtime, hf, tiny, mode):
    """k_ratio / keep 1.0: every real-tile row kept; logits as the reference's, and as the untrimmed
    runtime's when the prompt starts with the image (no row blind to images)."""
    m = runtime
    model, proc, ref = hf
    s = proc.size["height"]
    tok = tiny.hf_dir / "tokenizer.json"
    img = mr.test_image(3 * s, s, 31)
    for ids in ([fm.IMAGE_TOKEN_ID] + fm.encode(tok, "What is this?"), fm.prompt_ids(tok, "What is this?", 1)):
        inp = make_inputs(proc, ids, [img], fm.IMAGE_TOKEN_ID)
        want = ref.run(inp, Trim(**_trim_params(1.0, mode)))
        got = m.forward(ids, [np.asarray(img)], reduce=pyvtrim.TrimCrossAttn(**_trim_params(1.0, mode)))
        assert m.last_kept_image_rows() == want.kept
        assert float(np.max(np.abs(got - want.logits.numpy()))) <= LOGIT_TOL
        if ids[0] == fm.IMAGE_TOKEN_ID:
            base = m.forward(ids, [np.asarray(img)])
            assert float(np.max(np.abs(got - base))) <= 1e-5


def test_text_only_prompt(runtime, tiny):
    """No image: the cross-attention layers are skipped and there is nothing to trim."""
    m = runtime
    ids = fm.prompt_ids(tiny.hf_dir / "tokenizer.json", "Tell me a story.", 0)
    base = m.forward(ids)
    got = m.forward(ids, reduce=pyvtrim.TrimCrossAttn(k_ratio=0.25))
    assert float(np.max(np.abs(got - base))) <= 1e-6
    assert all(s["n_in"] == 0 and s["n_kept"] == 0 for s in m.last_stats["stages"] if s["method"] == "trim")
    out = m.generate(ids, max_tokens=4, reduce=pyvtrim.TrimCrossAttn(k_ratio=0.25))
    assert out == m.generate(ids, max_tokens=4)


def test_trim_does_not_leak_into_the_next_run(runtime, tiny, hf):
    m = runtime
    _, proc, _ = hf
    ids, images, _ = _inputs(tiny, proc, "tiles")
    base = m.forward(ids, images)
    m.forward(ids, images, reduce=pyvtrim.TrimCrossAttn(k_ratio=0.1))
    assert np.array_equal(m.forward(ids, images), base)
    assert m.last_stats["stages"] == []


@pytest.mark.parametrize("bad", [dict(k_ratio=0.0), dict(k_ratio=-0.1), dict(k_ratio=1.5), dict(mode="max"),
                                 dict(mode="budget"), dict(mode="budget", keep=0.0),
                                 dict(mode="budget", keep=1.5)])
def test_invalid_parameters(runtime, tiny, hf, bad):
    m = runtime
    _, proc, _ = hf
    ids, images, _ = _inputs(tiny, proc, "one_tile")
    with pytest.raises(ValueError):
        m.forward(ids, images, reduce=pyvtrim.TrimCrossAttn(**bad))


def test_model_without_cross_attention_raises(llava_tiny):
    if not hasattr(pyvtrim, "TrimCrossAttn"):
        pytest.skip("pyvtrim.TrimCrossAttn is not implemented yet")
    from fixtures import IMAGE_TOKEN_ID as LLAVA_IMAGE_ID

    with pyvtrim.Model(str(llava_tiny.gguf), n_ctx=1024, kv_type="f32", n_threads=2) as m:
        ids = m.tokenize("USER: <image>\nWhat is this? ASSISTANT:")
        assert LLAVA_IMAGE_ID in ids
        image = np.full((40, 40, 3), 128, np.uint8)
        with pytest.raises(ValueError, match="cross"):
            m.forward(ids, [image], reduce=pyvtrim.TrimCrossAttn(k_ratio=0.25))
        m.forward(ids, [image])  # the model still works


# ---- the CLI ----------------------------------------------------------------------------------------


def _cli_has_trim() -> bool:
    from pyvtrim import cli

    sub = cli.build_parser()._subparsers._group_actions[0].choices["chat"]
    return any("--trim" in a.option_strings for a in sub._actions)


def test_cli_trim_flag(runtime, tiny, tmp_path, capsys):
    from pyvtrim import cli

    if not _cli_has_trim():
        pytest.skip("pyvtrim chat has no --trim flag yet")
    m = runtime
    s = int(m.info["image_size"])
    path = tmp_path / "picture.png"
    mr.test_image(2 * s, s, 41).save(path)
    want = m.chat(str(path), "What is this?", max_tokens=6, reduce=pyvtrim.TrimCrossAttn(k_ratio=0.25))
    rc = cli.main(["chat", str(tiny.gguf), "--image", str(path), "--prompt", "What is this?", "--max-tokens", "6",
                   "--kv-type", "f32", "--threads", "2", "--trim", "0.25"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out == want + "\n"


def test_cli_trim_on_llava_fails(llava_tiny, tmp_path, capsys):
    from PIL import Image

    from pyvtrim import cli

    if not hasattr(pyvtrim, "TrimCrossAttn") or not _cli_has_trim():
        pytest.skip("pyvtrim chat has no --trim flag yet")
    path = tmp_path / "picture.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(path)
    argv = ["chat", str(llava_tiny.gguf), "--image", str(path), "--prompt", "Hi", "--max-tokens", "2", "--trim", "0.25"]
    try:
        rc = cli.main(argv)
        message = capsys.readouterr().err
    except ValueError as e:
        rc, message = 1, str(e)
    assert rc != 0
    assert "cross" in message
