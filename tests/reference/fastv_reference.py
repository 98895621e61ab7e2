"""A PyTorch reference of FastV on top of transformers' LlavaForConditionalGeneration.

Written from the paper and docs/DESIGN.md, independently of the runtime: layers 0..K-1 run on every token; the
image rows are ranked by layer K-1's attention probabilities (mean over heads) of the last prompt row
("last") or of the text rows after the last image ("mean"); the top int((1 - R) * N) image rows are kept
(ties: lower index first) with every text row, in order and with their ORIGINAL positions; layers K.. run
on the kept rows only. Generation recomputes the whole sequence each step with the kept set fixed at the
prefill, which is what a KV cache of kept rows computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass
class FastVResult:
    logits: torch.Tensor          # [n_vocab], last row
    kept_image_rows: list[int]    # sequence indices of the kept image rows


def _causal(pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
    """Additive mask [1, 1, n_q, n_k]: a row sees the rows at or before it (by sequence order)."""
    visible = pos_k[None, :] <= pos_q[:, None]
    mask = torch.zeros(visible.shape, dtype=torch.float32)
    mask[~visible] = float("-inf")
    return mask[None, None]


class FastVReference:
    def __init__(self, model, image_token_id: int) -> None:
        self.model = model
        self.lm = model.model.language_model
        self.image_token_id = image_token_id

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        emb = self.model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            cfg = self.model.config
            feats = self.model.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            )
            feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
            feats = torch.cat(list(feats), dim=0)
            mask = (input_ids == self.image_token_id)[..., None].expand_as(emb)
            emb = emb.masked_scatter(mask, feats.to(emb.dtype))
        return emb

    def _layers(self, h: torch.Tensor, pos: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        cos_sin = self.lm.rotary_emb(h, pos[None])
        mask = _causal(pos, pos)
        for layer in self.lm.layers[lo:hi]:
            h = layer(h, attention_mask=mask, position_ids=pos[None], position_embeddings=cos_sin)
        return h

    def _attention_probs(self, h: torch.Tensor, pos: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Layer layer_idx's softmax attention [n_head, n, n] for hidden states h entering it."""
        layer = self.lm.layers[layer_idx]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        n = x.shape[1]
        hd = attn.head_dim
        q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
        cos, sin = self.lm.rotary_emb(h, pos[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + _causal(pos, pos)
        return torch.softmax(scores.float(), dim=-1)[0]

    @torch.no_grad()
    def select(self, input_ids: torch.Tensor, pixel_values, k: int, ratio: float, score: str) -> list[int]:
        ids = input_ids[0]
        n = ids.shape[0]
        pos = torch.arange(n)
        h = self._layers(self.embed(input_ids, pixel_values), pos, 0, k - 1)
        probs = self._attention_probs(h, pos, k - 1).mean(dim=0)          # [n, n], mean over heads
        is_image = (ids == self.image_token_id).tolist()
        image_rows = [i for i in range(n) if is_image[i]]
        if score == "last":
            row_scores = probs[n - 1]
        else:
            last_image = max(image_rows)
            q_rows = list(range(last_image + 1, n)) or [n - 1]
            row_scores = probs[q_rows].mean(dim=0)
        n_keep = int(math.floor((1.0 - ratio) * len(image_rows) + 1e-6))
        ranked = sorted(image_rows, key=lambda i: (-float(row_scores[i]), i))
        return sorted(ranked[:n_keep])

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, pixel_values, k: int, kept_image_rows: list[int],
               n_prompt: int) -> torch.Tensor:
        """Last-row logits of input_ids (a prompt of n_prompt rows plus generated rows) with the kept set fixed."""
        ids = input_ids[0]
        n = ids.shape[0]
        pos = torch.arange(n)
        h = self._layers(self.embed(input_ids, pixel_values), pos, 0, k)
        kept = set(kept_image_rows)
        keep = [i for i in range(n) if i >= n_prompt or ids[i] != self.image_token_id or i in kept]
        keep_t = torch.tensor(keep)
        h = self._layers(h[:, keep_t], pos[keep_t], k, len(self.lm.layers))
        h = self.lm.norm(h)
        return self.model.lm_head(h[0, -1])

    @torch.no_grad()
    def run(self, input_ids, pixel_values, k: int, ratio: float, score: str = "last") -> FastVResult:
        kept = self.select(input_ids, pixel_values, k, ratio, score)
        return FastVResult(self.logits(input_ids, pixel_values, k, kept, input_ids.shape[1]), kept)

    @torch.no_grad()
    def greedy(self, input_ids, pixel_values, k: int, ratio: float, n_new: int, score: str = "last") -> list[int]:
        kept = self.select(input_ids, pixel_values, k, ratio, score)
        n_prompt = input_ids.shape[1]
        seq = input_ids
        out: list[int] = []
        for _ in range(n_new):
            nxt = int(torch.argmax(self.logits(seq, pixel_values, k, kept, n_prompt)))
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        return out
