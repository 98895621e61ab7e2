"""A plain-numpy Llama-3.2-Vision forward pass that reads weights and keys from a converted mllama GGUF.

It applies RoPE the way ggml's normal mode does (adjacent pairs, theta divided by rope_freqs), so
agreement with transformers' logits checks the converter's names, Q/K permutation, llama3 frequency
factors, gates, tile embeddings and the interleaved intermediate-layer features, independently of the
C runtime. It is also a readable statement of what HF computes (see mllama_reference.py's notes):
  * vision attention: HF's mask blocks a pair only when BOTH tokens are padding (padding patches of a
    tile, or padding tiles), so real tokens also attend to padding tokens;
  * local layers attend across all tiles of an image at once (one sequence of max_tiles x padded tiles);
  * cross-attention rows with no image: all-zero mask (uniform attention over every vision token), MLP
    output zeroed; text-only prompts skip cross layers.
Slow and simple on purpose: float64, no cache.
"""

from __future__ import annotations

import math

import numpy as np

from gguf_reference import Weights, gelu, layer_norm, rms_norm, silu, softmax  # noqa: F401

PRE_POST_LN_EPS = 1e-5  # nn.LayerNorm's default: HF's layernorm_pre / layernorm_post ignore norm_eps


def _attn(x, w, b, n_head, mask):
    n, d_model = x.shape
    d = d_model // n_head
    q = (x @ w[b + "attn_q.weight"].T).reshape(n, n_head, d)
    k = (x @ w[b + "attn_k.weight"].T).reshape(n, n_head, d)
    v = (x @ w[b + "attn_v.weight"].T).reshape(n, n_head, d)
    att = softmax(np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask)
    return np.einsum("hqk,khd->qhd", att, v).reshape(n, d_model) @ w[b + "attn_out.weight"].T


def _vision_layer(x, w, b, n_head, eps, mask, gated):
    ga = math.tanh(w[b + "gate_attn"][0]) if gated else 1.0
    gf = math.tanh(w[b + "gate_ffn"][0]) if gated else 1.0
    x = x + ga * _attn(layer_norm(x, w[b + "ln1.weight"], w[b + "ln1.bias"], eps), w, b, n_head, mask)
    h = layer_norm(x, w[b + "ln2.weight"], w[b + "ln2.bias"], eps)
    h = gelu(h @ w[b + "ffn_up.weight"].T + w[b + "ffn_up.bias"]) @ w[b + "ffn_down.weight"].T + w[b + "ffn_down.bias"]
    return x + gf * h


def vision_features(w: Weights, pixels: np.ndarray, aspect_ratio_id: int, n_tiles: int) -> np.ndarray:
    """One image: pixels [max_tiles, 3, S, S] -> vision output [max_tiles, n_pos, vision_output_dim]."""
    kv = w.kv
    V = "mllama.vision."
    P, S, H = kv[V + "patch_size"], kv[V + "image_size"], kv[V + "embedding_length"]
    T, n_head, eps = kv[V + "max_num_tiles"], kv[V + "attention.head_count"], kv[V + "attention.layer_norm_epsilon"]
    g = S // P
    N = g * g + 1
    assert pixels.shape == (T, 3, S, S)
    # patch embedding: a stride-P convolution = matmul over P x P x 3 patches (row-major patch order)
    patches = pixels.reshape(T, 3, g, P, g, P).transpose(0, 2, 4, 1, 3, 5).reshape(T, g * g, 3 * P * P)
    x = patches @ w["v.patch_embd.weight"].reshape(H, -1).T                        # [T, g*g, H]
    x = x + math.tanh(w["v.pre_tile_position_embd.gate"][0]) * \
        w["v.pre_tile_position_embd.weight"][aspect_ratio_id].reshape(T, 1, H)
    x = np.concatenate([np.broadcast_to(w["v.class_embd"], (T, 1, H)), x], axis=1)  # CLS first
    gate = math.tanh(w["v.position_embd.gate"][0])
    x = x + (1 - gate) * w["v.position_embd.weight"][None] + \
        gate * w["v.tile_position_embd.weight"][aspect_ratio_id].reshape(T, N, H)
    x = layer_norm(x, w["v.pre_ln.weight"], w["v.pre_ln.bias"], PRE_POST_LN_EPS)
    Np = (N + 7) // 8 * 8                                                           # HF pads each tile to x8
    x = np.concatenate([x, np.zeros((T, Np - N, H))], axis=1).reshape(T * Np, H)
    pad = np.ones((T, Np), bool)
    pad[:n_tiles, :N] = False
    pad = pad.reshape(-1)
    mask = np.where(pad[:, None] & pad[None, :], -np.inf, 0.0)
    # a padding query sees only real keys; a real query sees everything
    inter = []
    for i in range(kv[V + "block_count"]):
        x = _vision_layer(x, w, f"v.blk.{i}.", n_head, eps, mask, gated=False)
        inter.append(x)
    x = layer_norm(x, w["v.post_ln.weight"], w["v.post_ln.bias"], PRE_POST_LN_EPS).reshape(T, Np, H)
    x = x + math.tanh(w["v.post_tile_position_embd.gate"][0]) * \
        w["v.post_tile_position_embd.weight"][aspect_ratio_id].reshape(T, 1, H)
    x = x.reshape(T * Np, H)
    for i in range(kv[V + "global_block_count"]):
        x = _vision_layer(x, w, f"v.global.blk.{i}.", n_head, eps, mask, gated=True)
    idx = kv[V + "intermediate_layers_indices"]
    stacked = np.stack([inter[j] for j in idx], axis=-1).reshape(T, Np, H * len(idx))  # interleaved
    return np.concatenate([x.reshape(T, Np, H), stacked], axis=-1)[:, :N]


def cross_states(w: Weights, pixel_values, aspect_ratio_ids, num_tiles) -> np.ndarray:
    """All images of one prompt -> projected vision tokens [n_images * max_tiles * n_pos, text hidden]."""
    feats = [vision_features(w, pixel_values[i], int(aspect_ratio_ids[i]), int(num_tiles[i]))
             for i in range(len(num_tiles))]
    f = np.concatenate([x.reshape(-1, x.shape[-1]) for x in feats], axis=0)
    return f @ w["mm.weight"].T + w["mm.bias"]


def rope_adjacent_factors(x, pos, base, factors):
    """ggml's normal-mode RoPE with freq_factors: pair (2i, 2i+1) turns by pos * base^(-2i/d) / factors[i]."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2) / d) / factors
    ang = pos[:, None, None] * inv[None, None, :]
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def mllama_logits(w: Weights, ids, states=None, cross_mask=None) -> np.ndarray:
    """Logits at every position. states: cross_states(...) or None (text only); cross_mask: HF's
    [n_tokens, n_images, max_tiles] 0/1 array (mllama_reference.cross_attention_mask(...)[0])."""
    kv = w.kv
    A = "mllama."
    n_layer, n_head, n_kv = kv[A + "block_count"], kv[A + "attention.head_count"], kv[A + "attention.head_count_kv"]
    d, eps, base = kv[A + "rope.dimension_count"], kv[A + "attention.layer_norm_rms_epsilon"], kv[A + "rope.freq_base"]
    cross = set(kv[A + "cross_attention_layers"])
    factors = w["rope_freqs.weight"] if "rope_freqs.weight" in w.g.tensor_names() else np.ones(d // 2)
    n = len(ids)
    x = w["token_embd.weight"][np.asarray(ids)]
    pos = np.arange(n, dtype=np.float64)
    causal = np.triu(np.full((n, n), -np.inf), 1)
    rep = n_head // n_kv
    if states is not None:
        n_pos = states.shape[0] // (cross_mask.shape[1] * cross_mask.shape[2])
        allowed = np.repeat(cross_mask.reshape(n, -1), n_pos, axis=1).astype(bool)    # [n, M]
        has_image = allowed.any(axis=1)
        xmask = np.where(allowed | ~has_image[:, None], 0.0, -np.inf)
    for i in range(n_layer):
        b = f"blk.{i}."
        if i in cross:
            if states is None:
                continue
            h = rms_norm(x, w[b + "attn_norm.weight"], eps)
            q = rms_norm((h @ w[b + "cross_attn_q_proj.weight"].T).reshape(n, n_head, d),
                         w[b + "cross_attn_q_norm.weight"], eps)
            k = rms_norm((states @ w[b + "cross_attn_k_proj.weight"].T).reshape(-1, n_kv, d),
                         w[b + "cross_attn_k_norm.weight"], eps)
            v = (states @ w[b + "cross_attn_v_proj.weight"].T).reshape(-1, n_kv, d)
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            att = softmax(np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + xmask)
            o = np.einsum("hqk,khd->qhd", att, v).reshape(n, n_head * d) @ w[b + "cross_attn_o_proj.weight"].T
            x = x + math.tanh(w[b + "cross_attn_attn_gate"][0]) * o
            h = rms_norm(x, w[b + "ffn_norm.weight"], eps)
            m = (silu(h @ w[b + "ffn_gate.weight"].T) * (h @ w[b + "ffn_up.weight"].T)) @ w[b + "ffn_down.weight"].T
            x = x + math.tanh(w[b + "cross_attn_mlp_gate"][0]) * m * has_image[:, None]
            continue
        h = rms_norm(x, w[b + "attn_norm.weight"], eps)
        q = rope_adjacent_factors((h @ w[b + "attn_q.weight"].T).reshape(n, n_head, d), pos, base, factors)
        k = rope_adjacent_factors((h @ w[b + "attn_k.weight"].T).reshape(n, n_kv, d), pos, base, factors)
        v = (h @ w[b + "attn_v.weight"].T).reshape(n, n_kv, d)
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = softmax(np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + causal)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(n, n_head * d) @ w[b + "attn_output.weight"].T
        h = rms_norm(x, w[b + "ffn_norm.weight"], eps)
        x = x + (silu(h @ w[b + "ffn_gate.weight"].T) * (h @ w[b + "ffn_up.weight"].T)) @ w[b + "ffn_down.weight"].T
    return rms_norm(x, w["output_norm.weight"], eps) @ w["output.weight"].T
