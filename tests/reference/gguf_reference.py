"""A plain-numpy LLaVA-1.5 forward pass that reads weights from a converted GGUF ("single" layout).

It applies RoPE the way ggml's normal mode does (adjacent pairs), so agreement with transformers'
logits checks the converter's Q/K permutation, tensor names, fc1/fc2 roles, CLS handling and
keys — independently of the C runtime. Slow and simple on purpose: float64, no caching.
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def quick_gelu(x):
    return x / (1.0 + np.exp(-1.702 * x))


def silu(x):
    return x / (1.0 + np.exp(-x))


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def rope_adjacent(x, pos, base):
    """ggml's GGML_ROPE_TYPE_NORMAL: rotate dimension pairs (2i, 2i+1). x: (n_tok, n_head, d)."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None, None] * inv[None, None, :]
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


class Weights:
    def __init__(self, g):
        """g: an object with .kv (dict) and .f32(name) -> numpy array (see tests/test_convert.py)."""
        self.g = g
        self.kv = g.kv

    def __getitem__(self, name):
        return self.g.f32(name).astype(np.float64)


def text_logits(w: Weights, embeds: np.ndarray) -> np.ndarray:
    kv = w.kv
    n_layer, n_head = kv["llama.block_count"], kv["llama.attention.head_count"]
    n_kv, d = kv["llama.attention.head_count_kv"], kv["llama.rope.dimension_count"]
    eps, base = kv["llama.attention.layer_norm_rms_epsilon"], kv["llama.rope.freq_base"]
    n = embeds.shape[0]
    pos = np.arange(n, dtype=np.float64)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    x = embeds
    for i in range(n_layer):
        b = f"blk.{i}."
        h = rms_norm(x, w[b + "attn_norm.weight"], eps)
        q = rope_adjacent((h @ w[b + "attn_q.weight"].T).reshape(n, n_head, d), pos, base)
        k = rope_adjacent((h @ w[b + "attn_k.weight"].T).reshape(n, n_kv, d), pos, base)
        v = (h @ w[b + "attn_v.weight"].T).reshape(n, n_kv, d)
        rep = n_head // n_kv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = softmax(np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(n, n_head * d)
        x = x + o @ w[b + "attn_output.weight"].T
        h = rms_norm(x, w[b + "ffn_norm.weight"], eps)
        x = x + (silu(h @ w[b + "ffn_gate.weight"].T) * (h @ w[b + "ffn_up.weight"].T)) @ w[b + "ffn_down.weight"].T
    return rms_norm(x, w["output_norm.weight"], eps) @ w["output.weight"].T


def image_features(w: Weights, pixels: np.ndarray) -> np.ndarray:
    """pixels: (3, S, S) preprocessed; returns the projected image tokens (n_tokens, n_embd)."""
    kv = w.kv
    P, H = kv["clip.vision.patch_size"], kv["clip.vision.embedding_length"]
    n_head, eps = kv["clip.vision.attention.head_count"], kv["clip.vision.attention.layer_norm_epsilon"]
    n_layer = kv["clip.vision.block_count"]
    act = gelu if kv["clip.use_gelu"] else quick_gelu
    S = pixels.shape[-1]
    g = S // P
    patches = pixels.reshape(3, g, P, g, P).transpose(1, 3, 0, 2, 4).reshape(g * g, 3 * P * P)  # row-major grid
    emb = patches @ w["v.patch_embd.weight"].reshape(H, -1).T
    x = np.concatenate([w["v.class_embd"][None, :], emb]) + w["v.position_embd.weight"]
    x = layer_norm(x, w["v.pre_ln.weight"], w["v.pre_ln.bias"], eps)
    hidden = [x]
    d = H // n_head
    for i in range(n_layer):
        b = f"v.blk.{i}."
        h = layer_norm(x, w[b + "ln1.weight"], w[b + "ln1.bias"], eps)
        q, k, v = ((h @ w[b + f"attn_{t}.weight"].T + w[b + f"attn_{t}.bias"]).reshape(-1, n_head, d) for t in "qkv")
        att = softmax(np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d))
        o = np.einsum("hqk,khd->qhd", att, v).reshape(-1, H)
        x = x + o @ w[b + "attn_out.weight"].T + w[b + "attn_out.bias"]
        h = layer_norm(x, w[b + "ln2.weight"], w[b + "ln2.bias"], eps)
        h = act(h @ w[b + "ffn_up.weight"].T + w[b + "ffn_up.bias"])
        x = x + h @ w[b + "ffn_down.weight"].T + w[b + "ffn_down.bias"]
        hidden.append(x)
    feats = hidden[kv["vtrim.vision.feature_layer"]]  # HF indexing: hidden[0] is the embedding output
    if kv["vtrim.vision.feature_select"] == "default":
        feats = feats[1:]  # drop CLS
    assert kv["vtrim.projector.act"] == "gelu"
    h = gelu(feats @ w["mm.0.weight"].T + w["mm.0.bias"])
    return h @ w["mm.2.weight"].T + w["mm.2.bias"]


def llava_logits(w: Weights, ids, pixels=None) -> np.ndarray:
    """ids already expanded (one image token per image feature), as transformers takes them."""
    ids = np.asarray(ids)
    x = w["token_embd.weight"][ids]
    img = ids == w.kv["vtrim.image_token_id"]
    if img.any():
        x[img] = image_features(w, pixels)
    return text_logits(w, x)
