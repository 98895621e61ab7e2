"""The test fixtures themselves: the rebuilt Llama-2 tokenizer and the tiny random LLaVA models."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fixtures


def test_vocab_vectors_are_read(llama_spm_vocab):
    cases = fixtures.read_vocab_tests(llama_spm_vocab)
    assert len(cases) > 40
    assert ("Hello world", [15043, 3186]) in cases
    assert ("", []) in cases


def test_spm_model_reproduces_llama_vectors(spm_tokenizer_model, llama_spm_vocab):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(spm_tokenizer_model))
    assert sp.vocab_size() == 32000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    failures = [(text, sp.encode(text), ids) for text, ids in fixtures.read_vocab_tests(llama_spm_vocab)
                if sp.encode(text) != ids]
    assert not failures, failures[:3]


def test_spm_model_pieces_equal_the_gguf(spm_tokenizer_model, llama_spm_vocab):
    gguf = pytest.importorskip("gguf")
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto.FromString(spm_tokenizer_model.read_bytes())
    r = gguf.GGUFReader(str(llama_spm_vocab))
    assert [p.piece for p in m.pieces] == r.fields["tokenizer.ggml.tokens"].contents()
    assert [int(p.type) for p in m.pieces] == r.fields["tokenizer.ggml.token_type"].contents()
    np.testing.assert_array_equal([p.score for p in m.pieces],
                                  np.asarray(r.fields["tokenizer.ggml.scores"].contents(), np.float32))
    assert m.trainer_spec.model_type == pb.TrainerSpec.BPE and m.trainer_spec.byte_fallback
    assert m.normalizer_spec.add_dummy_prefix and not m.normalizer_spec.remove_extra_whitespaces


def test_tiny_llava_files(llava_tiny_gqa):
    d = llava_tiny_gqa.hf_dir
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
                 "tokenizer_config.json", "preprocessor_config.json"):
        assert (d / name).is_file(), name
    cfg = json.loads((d / "config.json").read_text())
    tc = cfg["text_config"]
    assert tc["num_attention_heads"] == 4 and tc["num_key_value_heads"] == 2
    rope = (tc.get("rope_parameters") or {}).get("rope_theta", tc.get("rope_theta"))
    assert rope == 50000.0
    assert tc["vocab_size"] == fixtures.PADDED_VOCAB
    assert cfg.get("image_token_id", cfg.get("image_token_index")) == fixtures.IMAGE_TOKEN_ID
    assert cfg["vision_feature_layer"] == -2 and cfg["projector_hidden_act"] == "gelu"


def test_tiny_llava_tokenizer_and_template(llava_tiny):
    from transformers import AutoProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llava_tiny.hf_dir))
    assert tok.convert_tokens_to_ids("<image>") == fixtures.IMAGE_TOKEN_ID
    assert tok.convert_tokens_to_ids("<pad>") == fixtures.PAD_TOKEN_ID
    assert tok("Hello world").input_ids == [1, 15043, 3186]
    proc = AutoProcessor.from_pretrained(str(llava_tiny.hf_dir))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == "USER: <image>\nWhat is this? ASSISTANT:"


def test_tiny_llava_logits_have_unit_scale(llava_tiny):
    """initializer_range 0.2 gives logits with a std of order 1 (0.02 would give ~0.03)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    m = LlavaForConditionalGeneration.from_pretrained(str(llava_tiny.hf_dir)).eval()
    n_img = (llava_tiny.params["image_size"] // llava_tiny.params["patch_size"]) ** 2
    ids = [1, 3148, 1001, 29901, 29871] + [fixtures.IMAGE_TOKEN_ID] * n_img + [13, 5618, 338, 445, 29973]
    torch.manual_seed(0)
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([ids]), pixel_values=torch.randn(1, 3, 30, 30)).logits[0]
    std = float(logits.std())
    assert 0.3 < std < 10, std
    assert torch.isfinite(logits).all()


def test_tiny_llava_is_cached(tiny_llava_factory, llava_tiny):
    again = tiny_llava_factory(**{k: v for k, v in llava_tiny.params.items()})
    assert again.hf_dir == llava_tiny.hf_dir


def test_pad_variant_preprocessor(llava_tiny_pad):
    pp = json.loads((llava_tiny_pad.hf_dir / "preprocessor_config.json").read_text())
    assert pp["do_pad"] is True
    cfg = json.loads((llava_tiny_pad.hf_dir / "config.json").read_text())
    assert cfg["vision_config"]["hidden_act"] == "gelu"
