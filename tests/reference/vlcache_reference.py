"""A PyTorch reference of VL-Cache on top of transformers' LLaVA weights.

Written from the paper's method as the issue states it, independently of the runtime: a hand-written Llama
decoder (the HF modules' projections, norms, MLP and rotary embedding; attention written here) whose KV cache
is kept per layer and per KV head, so that heads may hold different positions. After the prefill, the
post-vision query rows (the rows after the last image row, or the last row) give per layer and query head
A = causal softmax(q K^T / sqrt(d)) over the layer's cached keys; the layer's density is 1 - the mean over
heads of the share of valid entries below threshold * row max; budgets beta_l = clip(d_l / sum d * budget *
L, 0.01, 1), k_l = max(1, floor(beta_l n_l + 0.5)); per KV head the w_l = min(k_l, max(1, floor(recent k_l +
0.5))) most recent rows and the k_l - w_l best by the group-mean of the summed attention (ties: lower
position). Optionally FastV first (its kept rows from fastv_reference), so VL-Cache scores what FastV kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fastv_reference import FastVReference


@dataclass
class LayerCache:
    k: list            # per KV head: [n_g, head_dim] post-RoPE
    v: list            # per KV head: [n_g, head_dim]
    pos: list          # per KV head: [n_g] positions


@dataclass
class VLCacheState:
    caches: list = field(default_factory=list)   # per layer
    q_post: list = field(default_factory=list)   # per layer: [n_head, n_q, head_dim] of the query rows
    q_pos: list = field(default_factory=list)
    n_past: int = 0


class VLCacheReference:
    def __init__(self, model, image_token_id: int) -> None:
        self.model = model
        self.lm = model.model.language_model
        self.cfg = self.lm.config
        self.n_head = self.cfg.num_attention_heads
        self.n_kv = self.cfg.num_key_value_heads
        self.hd = self.cfg.hidden_size // self.n_head
        self.image_token_id = image_token_id
        self.fastv = FastVReference(model, image_token_id)

    def embed(self, input_ids: torch.Tensor, pixel_values) -> torch.Tensor:
        return self.fastv.embed(input_ids, pixel_values)[0]

    # ---- the decoder over per-head caches -------------------------------------------------------

    @torch.no_grad()
    def extend(self, st: VLCacheState, h: torch.Tensor, pos: torch.Tensor, capture: set | None = None,
               drop_at: tuple | None = None) -> torch.Tensor:
        """Rows h [n, d] at positions pos through every layer, attending to each head's cache and causally to
        each other, appended to the caches; returns the last row's logits. capture: positions whose
        post-RoPE Q is kept per layer; drop_at (k, keep): from layer k on only the rows keep (FastV)."""
        first = not st.caches
        for il, layer in enumerate(self.lm.layers):
            if drop_at is not None and il == drop_at[0]:
                keep = torch.tensor(drop_at[1])
                h, pos = h[keep], pos[keep]
            attn = layer.self_attn
            x = layer.input_layernorm(h[None])
            n = h.shape[0]
            q = attn.q_proj(x).view(1, n, self.n_head, self.hd).transpose(1, 2)
            k = attn.k_proj(x).view(1, n, self.n_kv, self.hd).transpose(1, 2)
            v = attn.v_proj(x).view(1, n, self.n_kv, self.hd).transpose(1, 2)[0]
            cos, sin = self.lm.rotary_emb(x, pos[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q, k = q[0], k[0]                     # [heads, n, hd]
            if first:
                st.caches.append(LayerCache([k[g, :0] for g in range(self.n_kv)], [v[g, :0] for g in range(self.n_kv)],
                                            [pos[:0] for _ in range(self.n_kv)]))
            c = st.caches[il]
            rep = self.n_head // self.n_kv
            out = torch.empty(self.n_head, n, self.hd)
            for g in range(self.n_kv):
                c.k[g] = torch.cat([c.k[g], k[g]])
                c.v[g] = torch.cat([c.v[g], v[g]])
                c.pos[g] = torch.cat([c.pos[g], pos])
                vis = c.pos[g][None, :] <= pos[:, None]
                mask = torch.zeros(vis.shape)
                mask[~vis] = float("-inf")
                for hh in range(g * rep, (g + 1) * rep):
                    a = torch.softmax(q[hh] @ c.k[g].T / math.sqrt(self.hd) + mask, dim=-1)
                    out[hh] = a @ c.v[g]
            if capture:
                sel = [i for i in range(n) if int(pos[i]) in capture]
                st.q_post.append(q[:, sel])
                st.q_pos = [int(pos[i]) for i in sel]
            o = attn.o_proj(out.transpose(0, 1).reshape(1, n, -1))
            h = h + o[0]
            h = h + layer.mlp(layer.post_attention_layernorm(h[None]))[0]
        st.n_past = int(pos[-1]) + 1
        return self.model.lm_head(self.lm.norm(h[-1:]))[0]

    # ---- VL-Cache -------------------------------------------------------------------------------

    def choose(self, st: VLCacheState, budget: float, threshold: float, recent: float) -> list:
        """Per layer, per KV head: the kept row indices (ascending). Heads share the cache before this."""
        L = len(st.caches)
        q_pos = torch.tensor(st.q_pos)
        dens, scores = [], []
        rep = self.n_head // self.n_kv
        for il in range(L):
            c = st.caches[il]
            kpos = c.pos[0]
            vis = kpos[None, :] <= q_pos[:, None]
            mask = torch.zeros(vis.shape)
            mask[~vis] = float("-inf")
            sp, s = [], np.zeros((self.n_kv, kpos.shape[0]))
            for hh in range(self.n_head):
                g = hh // rep
                a = torch.softmax(st.q_post[il][hh] @ c.k[g].T / math.sqrt(self.hd) + mask, dim=-1)
                a64 = a.double().numpy()
                mx = a64.max(axis=1, keepdims=True)
                valid = vis.numpy()
                sp.append(float(((a64 < threshold * mx) & valid).sum()) / float(valid.sum()))
                s[g] += a64.sum(axis=0) / rep
            dens.append(1.0 - float(np.mean(sp)))
            scores.append(s)
        total = sum(dens)
        kept = []
        # The smallest score gap between a kept and a dropped candidate of any (layer, head): the float order
        # of ggml and torch may differ by ~1e-7 relative, so a smaller gap could flip a choice.
        self.last_margin = math.inf
        for il in range(L):
            n = st.caches[il].pos[0].shape[0]
            beta = min(1.0, max(0.01, dens[il] / total * budget * L))
            k = min(n, max(1, math.floor(beta * n + 0.5)))
            w = min(k, max(1, math.floor(recent * k + 0.5)))
            per_head = []
            for g in range(self.n_kv):
                old = sorted(range(n - w), key=lambda j: (-scores[il][g][j], j))
                if 0 < k - w < len(old):
                    gap = scores[il][g][old[k - w - 1]] - scores[il][g][old[k - w]]
                    self.last_margin = min(self.last_margin, gap)
                per_head.append(sorted(old[: k - w] + list(range(n - w, n))))
            kept.append(per_head)
        return kept

    def compact(self, st: VLCacheState, kept: list) -> None:
        for c, per_head in zip(st.caches, kept):
            for g, rows in enumerate(per_head):
                idx = torch.tensor(rows, dtype=torch.long)
                c.k[g], c.v[g], c.pos[g] = c.k[g][idx], c.v[g][idx], c.pos[g][idx]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, pixel_values, budget: float | None, threshold: float = 0.01,
                recent: float = 0.1, fastv: tuple | None = None) -> tuple:
        """(state, logits): the prompt through the decoder (FastV (k, ratio) first if given), then VL-Cache
        at budget (None: none)."""
        ids = input_ids[0]
        n = ids.shape[0]
        is_image = (ids == self.image_token_id).tolist()
        last_image = max(i for i in range(n) if is_image[i])
        q_rows = list(range(last_image + 1, n)) or [n - 1]
        drop_at = None
        if fastv is not None:
            k, ratio = fastv
            kept_img = set(self.fastv.select(input_ids, pixel_values, k, ratio, "last"))
            drop_at = (k, [i for i in range(n) if not is_image[i] or i in kept_img or i == n - 1])
        st = VLCacheState()
        logits = self.extend(st, self.embed(input_ids, pixel_values), torch.arange(n), set(q_rows), drop_at)
        if budget is not None:
            self.compact(st, self.choose(st, budget, threshold, recent))
        return st, logits

    @torch.no_grad()
    def turn(self, st: VLCacheState, input_ids: torch.Tensor, pixel_values, budget: float, threshold: float = 0.01,
             recent: float = 0.1) -> torch.Tensor:
        """A later prompt turn with images appended to st (whose heads may already hold different rows), then
        VL-Cache over the whole cache; the turn's last logits."""
        ids = input_ids[0]
        n = ids.shape[0]
        is_image = (ids == self.image_token_id).tolist()
        last_image = max(i for i in range(n) if is_image[i])
        pos = torch.arange(st.n_past, st.n_past + n)
        q_pos = {int(pos[i]) for i in (list(range(last_image + 1, n)) or [n - 1])}
        st.q_post = []
        logits = self.extend(st, self.embed(input_ids, pixel_values), pos, q_pos)
        self.compact(st, self.choose(st, budget, threshold, recent))
        return logits

    @torch.no_grad()
    def step(self, st: VLCacheState, tokens: list[int]) -> torch.Tensor:
        """Appends text tokens (a decode step, or a later prompt turn); their last row's logits."""
        h = self.model.get_input_embeddings()(torch.tensor(tokens))
        return self.extend(st, h, torch.arange(st.n_past, st.n_past + len(tokens)))

    @staticmethod
    def positions(st: VLCacheState) -> list:
        """Per layer, per KV head: the cached positions."""
        return [[c.pos[g].tolist() for g in range(len(c.pos))] for c in st.caches]
