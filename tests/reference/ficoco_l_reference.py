"""A PyTorch reference of FiCoCo-L on top of transformers' LlavaForConditionalGeneration.

Written from the FiCoCo issue ("FiCoCo-L") and docs/DESIGN.md, independently of the runtime. The decoder runs
as a hand-written loop over the HF LlamaDecoderLayer modules with explicit position ids. After layer l-1, for
l = start_layer .. n_layer-1 (step s = l - start_layer of S = n_layer - start_layer):
- A = layer l-1's pre-softmax logits q.k / sqrt(d), query heads averaged (GQA keys repeated), among the
  prompt's current rows, before any mask;
- per image, over its current rows: s_i = beta * mean_{j != i} A[i, j] - (1 - beta) * mean_{t in T} A[t, i],
  T = the text rows after the last image row (the last row when there are none);
- R = N - tokens, r_s = R // S + (1 if s < R % S else 0); the r_s rows of largest s go (ties: lower index);
- each dropped i merges into the m = max(1, ceil((1 - eps) * n_kept - 1e-6)) kept rows j of its image of
  largest A[i, j] (ties: lower index), weights softmax over them; kept j <- (h_j + sum a h_i) / (1 + sum a),
  every merge reading the states after layer l-1;
- layers >= l run on the kept rows at their original positions.

A prompt's decisions (per step: the dropped rows and the merges) are made once, on that prompt; later rows
(generated tokens, a later turn) replay them: a full recompute with the decisions fixed is what a KV cache of
the rows each layer saw computes, since attention is causal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fastv_reference import FastVReference, _causal


@dataclass
class Step:
    dropped: list[int]                        # sequence indices
    merges: list[tuple[int, int, float]]      # (src, dst, weight)
    min_gap: float                            # smallest score gap at this step's cut (ties decide nothing)


@dataclass
class Decisions:
    """One prompt's FiCoCo-L: steps[s] is the step at layer start_layer + s."""

    start_layer: int
    steps: list[Step] = field(default_factory=list)


@dataclass
class FiCoCoLResult:
    logits: torch.Tensor
    kept_image_rows: list[int]
    decisions: Decisions


def step_drop(total: int, n_steps: int, step: int) -> int:
    if total <= 0:
        return 0
    return total // n_steps + (1 if step < total % n_steps else 0)


class FiCoCoLReference(FastVReference):
    """embed() and the causal mask are FastV's; the rest is FiCoCo-L's."""

    def __init__(self, model, image_token_id: int, n_image_tokens: int) -> None:
        super().__init__(model, image_token_id)
        self.n_image_tokens = n_image_tokens

    def _layer(self, il: int, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cos_sin = self.lm.rotary_emb(h, pos[None])
        return self.lm.layers[il](h, attention_mask=_causal(pos, pos), position_ids=pos[None],
                                  position_embeddings=cos_sin)

    def _logit_matrix(self, il: int, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Layer il's head-mean pre-softmax logits [n, n] (query, key) for the rows h entering it; no mask."""
        layer = self.lm.layers[il]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        n, hd = x.shape[1], attn.head_dim
        q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
        cos, sin = self.lm.rotary_emb(h, pos[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return (q @ k.transpose(-1, -2) / math.sqrt(hd))[0].mean(dim=0)

    def _decide(self, A: torch.Tensor, rows: list[int], ids: list[int], image_of: dict[int, int], step: int,
                n_steps: int, tokens: int, beta: float, eps: float) -> Step:
        """One step over the prompt's current rows (sequence indices, ascending); A among them."""
        at = {r: i for i, r in enumerate(rows)}
        A = A.double()
        image_rows = [r for r in rows if ids[r] == self.image_token_id]
        last_image = max(image_rows)
        t_rows = [r for r in rows if r > last_image] or [rows[-1]]
        dropped, merges, min_gap = [], [], math.inf
        for g in sorted(set(image_of[r] for r in image_rows)):
            cand = [r for r in image_rows if image_of[r] == g and r != rows[-1]]
            r_s = step_drop(len(cand) - tokens, n_steps - step, 0)
            if r_s <= 0:
                continue
            score = {}
            for a in cand:
                sim = sum(float(A[at[a], at[b]]) for b in cand if b != a) / max(1, len(cand) - 1)
                flow = sum(float(A[at[t], at[a]]) for t in t_rows) / len(t_rows)
                score[a] = beta * sim - (1.0 - beta) * flow
            ranked = sorted(cand, key=lambda a: (-score[a], a))
            min_gap = min(min_gap, score[ranked[r_s - 1]] - score[ranked[r_s]])
            drop = sorted(ranked[:r_s])
            kept = [a for a in cand if a not in set(drop)]
            m = max(1, math.ceil((1.0 - eps) * len(kept) - 1e-6))
            for i in drop:
                tgt = sorted(kept, key=lambda j: (-float(A[at[i], at[j]]), j))[:m]
                logit = torch.tensor([float(A[at[i], at[j]]) for j in tgt], dtype=torch.float64)
                w = torch.softmax(logit, dim=0)
                merges.extend((i, j, float(wj)) for j, wj in zip(tgt, w))
            dropped.extend(drop)
        return Step(sorted(dropped), merges, min_gap)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, pixel_values, fixed: list[Decisions], new_prompt: range | None,
                tokens: int = 64, start_layer: int = 4, beta: float = 0.6, eps: float = 0.998):
        """Last-row logits of the sequence, the earlier prompts' decisions replayed and, with new_prompt (the
        rows of a prompt that holds images), its decisions made. Returns (logits, Decisions or None, alive)."""
        ids = input_ids[0].tolist()
        n, n_layer = len(ids), len(self.lm.layers)
        image_of, k = {}, 0
        for i, t in enumerate(ids):
            if t == self.image_token_id:
                image_of[i] = k // self.n_image_tokens
                k += 1
        h = self.embed(input_ids, pixel_values)
        alive = list(range(n))
        made = Decisions(start_layer) if new_prompt is not None else None
        for il in range(n_layer):
            pos = torch.tensor(alive)
            h_in = h
            h = self._layer(il, h_in, pos)
            steps: list[Step] = []
            for d in fixed:
                s = il + 1 - d.start_layer
                if 0 <= s < len(d.steps):
                    steps.append(d.steps[s])
            s = il + 1 - start_layer
            if made is not None and 0 <= s < n_layer - start_layer:
                rows = [r for r in alive if r in new_prompt]
                at = torch.tensor([alive.index(r) for r in rows])
                A = self._logit_matrix(il, h_in[:, at], pos[at])
                st = self._decide(A, rows, ids, image_of, s, n_layer - start_layer, tokens, beta, eps)
                made.steps.append(st)
                steps.append(st)
            if steps:
                at = {r: i for i, r in enumerate(alive)}
                src_h = h[0].double()
                new_h = src_h.clone()
                acc = torch.zeros(len(alive), dtype=torch.float64)
                for st in steps:
                    for src, dst, w in st.merges:
                        new_h[at[dst]] += w * src_h[at[src]]
                        acc[at[dst]] += w
                new_h = new_h / (1.0 + acc)[:, None]
                gone = set(r for st in steps for r in st.dropped)
                keep = [i for i, r in enumerate(alive) if r not in gone]
                h = new_h[keep].to(h.dtype)[None]
                alive = [alive[i] for i in keep]
        h = self.lm.norm(h)
        return self.model.lm_head(h[0, -1]), made, alive

    @torch.no_grad()
    def run(self, input_ids, pixel_values, **policy) -> FiCoCoLResult:
        logits, made, alive = self.forward(input_ids, pixel_values, [], range(input_ids.shape[1]), **policy)
        ids = input_ids[0].tolist()
        kept = [r for r in alive if ids[r] == self.image_token_id]
        return FiCoCoLResult(logits, kept, made)

    @torch.no_grad()
    def greedy(self, input_ids, pixel_values, fixed: list[Decisions], n_new: int, **policy) -> list[int]:
        """n_new greedy tokens after input_ids, every prompt's decisions fixed (none made)."""
        seq, out = input_ids, []
        for _ in range(n_new):
            logits, _, _ = self.forward(seq, pixel_values, fixed, None, **policy)
            out.append(int(torch.argmax(logits)))
            seq = torch.cat([seq, torch.tensor([[out[-1]]])], dim=1)
        return out
