"""The mllama test fixtures: the rebuilt Llama-3.2-Vision tokenizer, the tiny random models, and the
transformers reference helpers (tests/mllama_reference.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fixtures
import fixtures_mllama as fm

pytest.importorskip("tokenizers")


# ---- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_json_reproduces_llama_bpe_vectors(llama3_tokenizer_json, llama_bpe_vocab):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(llama3_tokenizer_json))
    cases = fixtures.read_vocab_tests(llama_bpe_vocab)
    assert len(cases) > 40
    failures = [(text, got, ids) for text, ids in cases
                if (got := tok.encode(text, add_special_tokens=False).ids) != ids]
    assert not failures, failures[:3]


def test_tokenizer_json_holds_the_llama3_vocab(llama3_tokenizer_json, llama_bpe_vocab):
    kv = fm.GgufFile(llama_bpe_vocab).kv
    tj = json.loads(llama3_tokenizer_json.read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    assert len(vocab) == fm.N_BASE_TOKENS
    tokens = kv["tokenizer.ggml.tokens"]
    assert all(tokens[i] == t for t, i in ((t, i) for t, i in vocab.items()))
    assert [" ".join(m) for m in tj["model"]["merges"]] == kv["tokenizer.ggml.merges"]
    assert tj["model"]["ignore_merges"] is True and tj["model"]["byte_fallback"] is False
    added = {a["id"]: a["content"] for a in tj["added_tokens"]}
    assert sorted(added) == list(range(fm.N_BASE_TOKENS, fm.TEXT_VOCAB + 1))
    assert all(a["special"] for a in tj["added_tokens"])
    # Llama-3.1/3.2 names (the archive has Llama-3.0's)
    assert (added[128000], added[128001], added[128004], added[128006], added[128007]) == (
        "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
        "<|end_header_id|>")
    assert (added[128008], added[128009], added[128010]) == ("<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
    assert (added[128011], added[128255]) == ("<|reserved_special_token_3|>", "<|reserved_special_token_247|>")
    assert added[128256] == "<|image|>"
    assert len(set(added.values())) == len(added)


def test_tokenizer_special_tokens_and_bos(llama3_tokenizer_json):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(llama3_tokenizer_json))
    assert tok.get_vocab_size() == fm.TEXT_VOCAB + 1
    assert tok.encode("<|image|>Hi<|eot_id|>", add_special_tokens=True).ids == [128000, 128256, 13347, 128009]
    assert fm.prompt_ids(llama3_tokenizer_json, "What is this?") == [
        128000, 128006, 882, 128007, 271, 128256, 3923, 374, 420, 30, 128009, 128006, 78191, 128007, 271]
    ids = fm.prompt_ids(llama3_tokenizer_json, "Look: ", n_images=2, image_first=False)
    assert ids.count(fm.IMAGE_TOKEN_ID) == 2 and ids.index(fm.IMAGE_TOKEN_ID) > 5


def test_hf_tokenizer_and_chat_template(mllama_tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(mllama_tiny.hf_dir))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (fm.BOS_ID, fm.EOT_ID, fm.PAD_ID)
    assert tok.convert_tokens_to_ids("<|image|>") == fm.IMAGE_TOKEN_ID
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is this?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok(text, add_special_tokens=False)["input_ids"] == fm.prompt_ids(mllama_tiny.tokenizer_json,
                                                                            "What is this?")
    text_only = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                        add_generation_prompt=True)
    assert text_only.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")
    assert text_only.endswith("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                              "<|start_header_id|>assistant<|end_header_id|>\n\n")


# ---- the tiny models ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mllama_tiny", "mllama_tiny_b"])
def test_tiny_mllama_files_and_config(request, name):
    fx = request.getfixturevalue(name)
    p, d = fx.params, fx.hf_dir
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "preprocessor_config.json", "chat_template.json"):
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "mllama" and cfg["image_token_index"] == fm.IMAGE_TOKEN_ID
    tc, vc = cfg["text_config"], cfg["vision_config"]
    assert tc["cross_attention_layers"] == p["cross_layers"] and len(p["cross_layers"]) >= 2
    assert tc["vocab_size"] == fm.TEXT_VOCAB and 4 <= tc["num_hidden_layers"] <= 5
    assert vc["max_num_tiles"] == 4 and vc["intermediate_layers_indices"] == p["intermediate_layers"]
    assert vc["supported_aspect_ratios"] == [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
    assert vc["image_size"] // vc["patch_size"] in (2, 4) and vc["num_global_layers"] in (1, 2)
    rope = tc["rope_parameters"]
    assert rope["rope_type"] == ("llama3" if p["rope_llama3"] else "default")
    pp = json.loads((d / "preprocessor_config.json").read_text())
    assert pp["size"] == {"height": p["image_size"], "width": p["image_size"]} and pp["max_image_tiles"] == 4


@pytest.mark.parametrize("name", ["mllama_tiny", "mllama_tiny_b"])
def test_tiny_mllama_weights(request, name):
    from safetensors.numpy import load_file

    fx = request.getfixturevalue(name)
    sd = load_file(str(fx.hf_dir / "model.safetensors"))
    assert sd["language_model.model.embed_tokens.weight"].shape[0] == fm.EMBED_ROWS
    assert sd["language_model.lm_head.weight"].shape[0] == fm.TEXT_VOCAB
    gates = {k: float(v.reshape(-1)[0]) for k, v in sd.items() if k.rsplit(".", 1)[-1].endswith("gate")
             or k.endswith("gate_attn") or k.endswith("gate_ffn")}
    n_cross = len(fx.params["cross_layers"])
    n_global = fx.params["vision_global_layers"]
    assert len(gates) == 2 * n_cross + 2 * n_global + 3  # + position, pre-tile, post-tile
    assert all(0.3 <= abs(g) <= 1.2 for g in gates.values()), gates


def test_tiny_mllama_is_cached(tiny_mllama_factory, mllama_tiny):
    assert tiny_mllama_factory() is mllama_tiny
    assert fm.cached_tiny_mllama(mllama_tiny.hf_dir.parent, key=mllama_tiny.hf_dir.name[len("mllama-tiny-"):]) \
        == mllama_tiny.hf_dir


# ---- the transformers reference -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_a(mllama_tiny):
    import mllama_reference as mr

    return mr.load_model(mllama_tiny.hf_dir), mr.load_image_processor(mllama_tiny.hf_dir)


def test_image_processor_is_the_pil_one(ref_a, mllama_tiny):
    import mllama_reference as mr

    _, proc = ref_a
    assert type(proc).__name__ == "MllamaImageProcessorPil"
    S = mllama_tiny.params["image_size"]
    pix = mr.preprocess(proc, [mr.test_image(3 * S - 5, S // 2 + 3), mr.test_image(S, 2 * S)])
    assert pix["pixel_values"].shape == (1, 2, 4, 3, S, S)
    assert pix["num_tiles"] == [[3, 2]]
    assert pix["aspect_ratio_mask"].tolist() == [[[1, 1, 1, 0], [1, 1, 0, 0]]]
    ratios = fm.supported_aspect_ratios(4)
    assert [ratios[i - 1] for i in pix["aspect_ratio_ids"][0]] == [[1, 3], [2, 1]]  # [tiles high, tiles wide]


def test_logits_have_unit_scale_and_the_image_matters(ref_a, mllama_tiny):
    import mllama_reference as mr

    model, proc = ref_a
    ids = fm.prompt_ids(mllama_tiny.tokenizer_json, "What is in this picture?")
    a = mr.run_hf(model, ids, [mr.test_image(50, 30)], proc)
    b = mr.run_hf(model, ids, [mr.test_image(30, 60, seed=5)], proc)
    std = a.logits.std(axis=-1)
    assert 0.5 < std.mean() < 5, std
    assert np.abs(a.last_logits - b.last_logits).max() > 0.5   # the vision path changes the answer
    pre_image = ids.index(fm.IMAGE_TOKEN_ID)
    # Rows before <|image|> attend to no tile, yet HF lets the image in: their all-masked row becomes an
    # all-zero mask (uniform attention over every vision token) and only the MLP output is zeroed.
    # A runtime that skips the cross-attention for those rows would differ from HF here.
    assert np.abs(a.logits[:pre_image] - b.logits[:pre_image]).max() > 1e-2


def test_reference_decoding_matches_generate(ref_a, mllama_tiny):
    import torch

    import mllama_reference as mr

    model, proc = ref_a
    ids = fm.prompt_ids(mllama_tiny.tokenizer_json, "Describe it.")
    r = mr.run_hf(model, ids, [mr.test_image(70, 40, seed=2)], proc, n_decode=5)
    assert len(r.tokens) == 5 and len(r.step_logits) == 5
    assert [int(np.argmax(s)) for s in r.step_logits] == r.tokens
    np.testing.assert_array_equal(r.step_logits[0], r.last_logits)
    t = {k: torch.from_numpy(r.inputs[k]) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                                                    "cross_attention_mask")}
    with torch.no_grad():
        g = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False, **t)
    assert g[0, len(ids):].tolist() == r.tokens
    assert r.cross_attention_states.shape == (4 * (1 + (mllama_tiny.params["image_size"] // 14) ** 2),
                                              mllama_tiny.params["text_hidden"])

    text = mr.run_hf(model, fm.prompt_ids(mllama_tiny.tokenizer_json, "Hello", n_images=0), n_decode=3)
    with torch.no_grad():
        g = model.generate(input_ids=torch.tensor([text.inputs["input_ids"][0].tolist()]), max_new_tokens=3,
                           do_sample=False)
    assert g[0, -3:].tolist() == text.tokens


def test_reference_cross_attention_mask_matches_the_processor(mllama_tiny):
    from transformers import AutoProcessor

    import mllama_reference as mr

    proc = AutoProcessor.from_pretrained(str(mllama_tiny.hf_dir))
    imgs = [mr.test_image(40, 90, seed=1), mr.test_image(20, 20, seed=2)]
    # The processor writes <|begin_of_text|> into the text itself; the tokenizer would add a second one.
    out = proc(text=["Compare <|image|>this and <|image|>that."], images=[imgs], return_tensors="np",
               add_special_tokens=False)
    ids = out["input_ids"][0].tolist()
    assert ids[0] == fm.BOS_ID and ids == fm.encode(mllama_tiny.tokenizer_json,
                                                    "<|begin_of_text|>Compare <|image|>this and <|image|>that.")
    pix = mr.preprocess(proc.image_processor, imgs)
    np.testing.assert_array_equal(pix["pixel_values"], out["pixel_values"])
    np.testing.assert_array_equal(pix["aspect_ratio_ids"], out["aspect_ratio_ids"])
    mask = mr.cross_attention_mask(ids, pix["num_tiles"][0], 4)
    np.testing.assert_array_equal(mask, out["cross_attention_mask"])
    first, second = [i for i, t in enumerate(ids) if t == fm.IMAGE_TOKEN_ID]
    assert not mask[0, :first].any()
    n0, n1 = pix["num_tiles"][0]
    assert mask[0, first:second, 0, :n0].all() and not mask[0, first:second, 0, n0:].any()
    assert not mask[0, first:second, 1].any()
    assert mask[0, second:, 1, :n1].all() and not mask[0, second:, 1, n1:].any() and not mask[0, second:, 0].any()
    with pytest.raises(ValueError, match="2 <\\|image\\|> tokens but 1 images"):
        mr.run_hf(None, ids, imgs[:1], proc.image_processor)
