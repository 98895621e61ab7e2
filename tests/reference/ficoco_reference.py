"""A PyTorch reference of FiCoCo-V on top of transformers' LlavaForConditionalGeneration.

Written from the paper (arXiv 2411.17686), issue 12 and docs/DESIGN.md, independently of the runtime. The CLIP
tower is driven piece by piece (embeddings, pre_layrnorm, each layer's layer_norm1, q/k/v/out projections,
layer_norm2, mlp; then feature select and the projector), so that a step can sit inside a layer:

- steps in vision layers start_layer .. f, f the last layer that runs (vision_feature_layer -2: n_layers - 2);
  S = f - start_layer + 1 steps, R = N - tokens patches go, step i removes R // S (+1 for i < R % S);
- in a step layer, after h = x + attn(ln1(x)) and before the MLP: A = head-mean of q k^T / sqrt(d_head) over the
  current rows; patch score s_i = lam * mean_{j current patches} A[i, j] - (1 - lam) * A[CLS, i];
- 2x2 windows of the original grid (narrower at an odd edge): in a window holding >= 2 current patches, the
  largest s (ties: lower patch index) becomes 2s if s > 0 else s / 2;
- the r_i largest s (ties: lower index) are dropped; each dropped i merges into the m = max(1, ceil((1 - eps)
  |kept| - 1e-6)) kept patches of largest A[i, j] (ties: lower index) with weights softmax of those A[i, j];
  kept j <- (h_j + sum a_ij h_i) / (1 + sum a_ij), all from the step's h; order kept, CLS first; MLP after.

Each image is reduced on its own. The decoder then sees `tokens` rows per image at contiguous positions.
FiCoCo-V composed with FastV: FastVReference (fastv_reference.py) with the reduced image features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastv_reference import FastVReference


@dataclass
class FiCoCoVImage:
    features: torch.Tensor        # [tokens, n_embd_text], the projector's output
    kept_patches: list[int]       # the kept patch indices (0-based, row-major), ascending


def _penalty(score: list[float], patches: list[int], grid: int) -> list[float]:
    best: dict[tuple[int, int], int] = {}
    count: dict[tuple[int, int], int] = {}
    for k, p in enumerate(patches):
        w = (p // grid // 2, p % grid // 2)
        count[w] = count.get(w, 0) + 1
        b = best.get(w)
        if b is None or score[k] > score[b] or (score[k] == score[b] and patches[k] < patches[b]):
            best[w] = k
    out = list(score)
    for w, k in best.items():
        if count[w] >= 2:
            out[k] = 2.0 * out[k] if out[k] > 0 else out[k] / 2.0
    return out


class FiCoCoVReference(FastVReference):
    def __init__(self, model, image_token_id: int, tokens: int, start_layer: int, lam: float = 0.35,
                 eps: float = 0.998) -> None:
        super().__init__(model, image_token_id)
        self.tokens, self.start_layer, self.lam, self.eps = tokens, start_layer, lam, eps
        tower = model.model.vision_tower
        self.vision = getattr(tower, "vision_model", tower)
        cfg = model.config
        n_layers = len(self.vision.encoder.layers)
        fl = cfg.vision_feature_layer
        self.n_run = n_layers + 1 + fl if fl < 0 else fl          # hidden_states[fl] is after n_run layers
        self.drop_cls = cfg.vision_feature_select_strategy == "default"
        self._cache: dict[int, list[FiCoCoVImage]] = {}

    def _step(self, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor, orig: list[int], r: int, grid: int):
        """One filter-correlate-compress step on h [n, d] (row 0 CLS); q, k: [n_head, n, head_dim]."""
        n = h.shape[0]
        a = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).mean(dim=0).double()    # [n, n]
        cand = list(range(1, n))
        score = [self.lam * float(a[i, 1:].mean()) - (1.0 - self.lam) * float(a[0, i]) for i in cand]
        score = _penalty(score, [orig[i] - 1 for i in cand], grid)
        ranked = sorted(range(len(cand)), key=lambda t: (-score[t], t))
        dropped = sorted(cand[t] for t in ranked[:r])
        kept = [i for i in range(n) if i not in set(dropped)]          # CLS is row 0, never a candidate
        kept_patches = [i for i in kept if i != 0]
        m = max(1, math.ceil((1.0 - self.eps) * len(kept_patches) - 1e-6))
        num = h.double().clone()
        den = torch.ones(n, dtype=torch.float64)
        for i in dropped:
            targets = sorted(kept_patches, key=lambda j: (-float(a[i, j]), j))[:m]
            w = torch.softmax(a[i, targets], dim=0)
            for j, wj in zip(targets, w):
                num[j] += wj * h[i].double()
                den[j] += wj
        out = (num / den[:, None]).to(h.dtype)
        return out[kept], [orig[i] for i in kept]

    def _layer_attn(self, layer, h: torch.Tensor):
        attn = layer.self_attn
        x = layer.layer_norm1(h)
        n, d = x.shape
        hd = d // attn.num_heads
        q = attn.q_proj(x).view(n, -1, hd).transpose(0, 1)
        k = attn.k_proj(x).view(n, -1, hd).transpose(0, 1)
        v = attn.v_proj(x).view(n, -1, hd).transpose(0, 1)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (p @ v).transpose(0, 1).reshape(n, d)
        return h + attn.out_proj(o), q, k

    @torch.no_grad()
    def image(self, pixel_values: torch.Tensor) -> FiCoCoVImage:
        """One image [3, H, W] through the tower with FiCoCo-V, then feature select and the projector."""
        vm = self.vision
        h = vm.pre_layrnorm(vm.embeddings(pixel_values[None]))[0]
        n_patches = h.shape[0] - 1
        grid = int(round(math.sqrt(n_patches)))
        f = self.n_run - 1
        steps = f - self.start_layer + 1
        total = n_patches - self.tokens
        orig = list(range(h.shape[0]))
        for il in range(self.n_run):
            layer = vm.encoder.layers[il]
            h, q, k = self._layer_attn(layer, h)
            if il >= self.start_layer:
                i = il - self.start_layer
                r = total // steps + (1 if i < total % steps else 0)
                if r > 0:
                    h, orig = self._step(h, q, k, orig, r, grid)
            h = h + layer.mlp(layer.layer_norm2(h))
        feats = h[1:] if self.drop_cls else h
        return FiCoCoVImage(self.model.model.multi_modal_projector(feats[None])[0],
                            [o - 1 for o in orig[1:]])

    def images(self, pixel_values: torch.Tensor) -> list[FiCoCoVImage]:
        key = id(pixel_values)
        if key not in self._cache:
            self._cache = {key: [self.image(pv) for pv in pixel_values]}
        return self._cache[key]

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """input_ids with `tokens` placeholders per image."""
        emb = self.model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            feats = torch.cat([im.features for im in self.images(pixel_values)], dim=0)
            mask = (input_ids == self.image_token_id)[..., None].expand_as(emb)
            emb = emb.masked_scatter(mask, feats.to(emb.dtype))
        return emb

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor, pixel_values) -> torch.Tensor:
        """Last-row logits with FiCoCo-V alone (the decoder sees every row it is given)."""
        h = self._layers(self.embed(input_ids, pixel_values), torch.arange(input_ids.shape[1]), 0,
                         len(self.lm.layers))
        return self.model.lm_head(self.lm.norm(h)[0, -1])

    @torch.no_grad()
    def greedy_alone(self, input_ids: torch.Tensor, pixel_values, n_new: int) -> list[int]:
        seq, out = input_ids, []
        for _ in range(n_new):
            nxt = int(torch.argmax(self.forward_logits(seq, pixel_values)))
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        return out
