"""A PyTorch reference of Trimmed Llama on top of transformers' MllamaForConditionalGeneration.

"Efficient LLaMA-3.2-Vision by Trimming Cross-attended Visual Features" (arXiv 2504.00557): the visual features
are trimmed once, at the first cross-attention layer, without training. Written from the paper, the issue and
docs/DESIGN.md, independently of the runtime; the decoder layers are transformers' own modules, called one by one.
The runtime (core/src/reduce/trim.c) follows the same decisions:

* Visual features: the rows of the cross-attention states, as HF's ``cross_attention_states``: for each image
  ``max_num_tiles * n_pos`` rows, image-major, then tile, then patch (CLS first). Row of (image i, tile t,
  patch p) = ``(i * max_num_tiles + t) * n_pos + p``. Kept rows are reported as these indices, ascending.
* Candidates: the rows of the REAL tiles of each image (tile < n_tiles of that image); rows of padding tiles
  are never kept. ``n_in`` = the number of candidates (all images).
* Query rows: the prompt rows whose cross-attention mask row sees at least one image (HF's
  ``full_text_row_masked_out_mask == 1`` after ``_prepare_cross_attention_mask``).
* Scores, at the first cross-attention layer L0: the probabilities HF's cross-attention computes there, softmax
  over ALL states of the layer with HF's mask (q_norm'd queries, k_norm'd keys, scaling head_dim^-0.5, the
  additive cross mask), KV heads repeated for GQA as ``repeat_kv`` (query head h reads KV head
  h // (n_head / n_head_kv)). ``score[h, j]`` = mean over the query rows of ``p[h, row, j]``.
* Per image: every image keeps its own fraction of its own candidates (the ranking never mixes images), so
  each image keeps at least one row and every query row still sees a kept row of each image it sees.
  Because a query row that does not see image i gives it probability 0, the mean over all query rows ranks
  image i's candidates exactly as the mean over the rows that see image i would.
* Counts: ``n_keep(f, n) = max(1, floor(f * n + 1e-6))`` for a fraction f (a double) of n candidates (the
  epsilon absorbs binary rounding: 0.29 * 100 = 28.999999999999996 keeps 29).
* mode "union" (default): each head keeps its top ``n_keep(k_ratio, n)`` candidates by ``score[h]``; an image
  keeps the union over heads (so the kept fraction adapts to the input, between k_ratio and
  n_head * k_ratio).
* mode "budget": the head-mean score ``mean_h score[h]``, top exactly ``n_keep(keep, n)`` per image.
* Ties (both modes): the lower row index first.
* If no prompt row sees any image, nothing is trimmed (every candidate is kept).
* Layers: L0 itself runs on all states (``trim_first_layer=False``), or, with ``trim_first_layer=True``, on
  the kept states only (the selection uses the full probabilities, then L0's attention is recomputed over the
  kept columns). Every later cross-attention layer computes (and caches) K/V of the kept states only, with the
  cross-attention mask columns GATHERED at the kept indices. Self-attention layers are unchanged.
* Rows that see no image: HF zeroes their mask row, so they attend uniformly over all states (and their MLP
  update is dropped); after trimming they attend uniformly over the layer's KEPT states.
* Decoding: a generated token sees what the last prompt row sees (HF ``generate`` repeats the last mask row),
  the kept set is fixed at the prefill. The reference recomputes the whole sequence for every new token with
  the same kept set, which is what trimmed cross caches plus a self-attention KV cache compute.
* Stats: ``n_in`` candidates, ``n_kept`` kept rows; ``kv_bytes_full`` = K and V of every cross-attention layer
  for all ``n_images * max_num_tiles * n_pos`` states (what the untrimmed cache holds, padding tiles
  included); ``kv_bytes_kept`` = what the trimmed caches hold (L0: all states, or the kept ones with
  trim_first_layer; later layers: the kept ones). See ``kv_bytes``.
* Without any image the cross-attention layers are skipped (as in HF) and there is nothing to trim.

Nothing trimmed: ``run(inp, trim=None)`` runs the layers as HF does and reproduces transformers' logits
(tests/test_trim.py: 1e-4). ``k_ratio=1.0`` (mode "union") keeps every candidate and drops only the padding-tile
rows; those are masked out for every row that sees an image, so the logits equal HF's whenever no prompt row is
a "uniform" row (the prompt starts with <|image|>) or no image has padding tiles. Otherwise the rows that see no
image (BOS and the header before the first <|image|>) average over the real tiles instead of all
max_num_tiles tiles from the second cross-attention layer on: a deliberate departure from HF (on the tiny
fixture mllama_tiny, whose self-attention layer 4 reads those rows, it moves the last logits by up to ~0.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask, repeat_kv
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

EPS_COUNT = 1e-6


@dataclass(frozen=True)
class Trim:
    """The reference's copy of pyvtrim.TrimCrossAttn's parameters."""

    k_ratio: float = 0.25
    mode: str = "union"
    keep: Optional[float] = None
    trim_first_layer: bool = False

    def check(self) -> None:
        if self.mode not in ("union", "budget"):
            raise ValueError(f"mode={self.mode!r}")
        if self.mode == "union" and not (0.0 < self.k_ratio <= 1.0):
            raise ValueError(f"k_ratio={self.k_ratio!r} must be in (0, 1]")
        if self.mode == "budget" and (self.keep is None or not (0.0 < self.keep <= 1.0)):
            raise ValueError(f"keep={self.keep!r} must be in (0, 1] for mode 'budget'")


def n_keep(fraction: float, n: int) -> int:
    return max(1, int(math.floor(fraction * n + EPS_COUNT))) if n > 0 else 0


@dataclass
class MllamaInputs:
    """What HF's MllamaForConditionalGeneration takes, for one sequence (batch 1)."""

    input_ids: torch.Tensor                      # [1, S]
    pixel_values: Optional[torch.Tensor]         # [1, n_images, max_tiles, 3, H, W]
    aspect_ratio_ids: Optional[torch.Tensor]     # [1, n_images]
    aspect_ratio_mask: Optional[torch.Tensor]    # [1, n_images, max_tiles]
    cross_attention_mask: Optional[torch.Tensor]  # [1, S, n_images, max_tiles], 1 = the row sees that tile
    n_tiles: list                                # per image

    @property
    def n_images(self) -> int:
        return len(self.n_tiles)

    def hf_kwargs(self) -> dict:
        kw = dict(input_ids=self.input_ids)
        if self.n_images:
            kw.update(pixel_values=self.pixel_values, aspect_ratio_ids=self.aspect_ratio_ids,
                      aspect_ratio_mask=self.aspect_ratio_mask, cross_attention_mask=self.cross_attention_mask)
        return kw


def make_inputs(image_processor, ids: Sequence[int], images: Sequence, image_token_id: int) -> MllamaInputs:
    """HF inputs for token ids (one image_token_id per image) and images (uint8 HxWx3 arrays or PIL images),
    the cross-attention mask built as MllamaProcessor builds it."""
    from PIL import Image

    ids = [int(t) for t in ids]
    input_ids = torch.tensor([ids], dtype=torch.long)
    if not images:
        return MllamaInputs(input_ids, None, None, None, None, [])
    pil = [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]
    r = image_processor(images=[pil], return_tensors="pt")
    n_tiles = [int(n) for n in r["num_tiles"][0]]
    max_tiles = r["pixel_values"].shape[2]
    token_mask = get_cross_attention_token_mask(ids, image_token_id)
    if len(token_mask) != len(images):
        raise ValueError(f"{len(token_mask)} image tokens for {len(images)} images")
    cam = convert_sparse_cross_attention_mask_to_dense([token_mask], [n_tiles], max_tiles, len(ids))
    return MllamaInputs(input_ids, r["pixel_values"].to(torch.float32), r["aspect_ratio_ids"],
                        r["aspect_ratio_mask"], torch.from_numpy(cam), n_tiles)


@dataclass
class Selection:
    kept: list                     # kept state rows, ascending
    n_in: int                      # candidates
    n_states: int                  # all state rows (n_images * max_tiles * n_pos)
    per_image: list                # [(n_candidates, n_kept)] per image
    layer: int                     # L0
    # For near-tie checks: the candidate rows of each image and their scores [n_groups, n_cand]
    # (union: one group per head; budget: one group, the head mean), and how many each group keeps.
    groups: list = field(default_factory=list)  # [(rows, scores [g, n], k)] per image

    def bounds(self, tol: float):
        """(must, may): the rows that are kept under any perturbation of the scores smaller than tol/2, and
        the rows that could be kept under one. The runtime's kept set must lie between them."""
        must, may = set(), set()
        for rows, scores, k in self.groups:
            n = len(rows)
            for s in scores:
                if k >= n:
                    must.update(rows)
                    may.update(rows)
                    continue
                order = sorted(range(n), key=lambda j: (-float(s[j]), j))
                s_k, s_next = float(s[order[k - 1]]), float(s[order[k]])
                must.update(rows[j] for j in range(n) if float(s[j]) > s_next + tol)
                may.update(rows[j] for j in range(n) if float(s[j]) >= s_k - tol)
        return must, may


@dataclass
class TrimResult:
    logits: torch.Tensor           # [n_vocab], last row, float32
    selection: Optional[Selection]

    @property
    def kept(self) -> Optional[list]:
        return None if self.selection is None else self.selection.kept


def kv_bytes(n_cross: int, n_states: int, n_kept: int, n_embd_kv: int, elem_bytes: int,
             trim_first_layer: bool) -> tuple:
    """(kv_bytes_full, kv_bytes_kept) of the cross-attention caches, K and V, every cross-attention layer."""
    row = 2 * n_embd_kv * elem_bytes
    full = n_cross * n_states * row
    first = n_kept if trim_first_layer else n_states
    return full, (first + (n_cross - 1) * n_kept) * row


class TrimReference:
    def __init__(self, model) -> None:
        self.model = model
        self.lm = model.model.language_model
        self.cross_layers = list(self.lm.cross_attention_layers)
        self.n_pos = model.model.vision_model.num_patches   # patches + CLS per tile

    # ---- pieces ---------------------------------------------------------------------------------

    @torch.no_grad()
    def states(self, inp: MllamaInputs) -> Optional[torch.Tensor]:
        """The cross-attention states [1, n_images * max_tiles * n_pos, hidden], as HF's MllamaModel makes them."""
        if not inp.n_images:
            return None
        mm = self.model.model
        v = mm.vision_model(pixel_values=inp.pixel_values, aspect_ratio_ids=inp.aspect_ratio_ids,
                            aspect_ratio_mask=inp.aspect_ratio_mask).last_hidden_state
        s = mm.multi_modal_projector(v).reshape(-1, v.shape[-2], mm.hidden_size)
        return s.reshape(1, -1, mm.hidden_size)

    def _cross_mask(self, inp: MllamaInputs, n_rows: int):
        """HF's additive cross mask [1, 1, n_rows, n_states] and row mask [1, 1, n_rows, 1]; rows past the
        prompt see what its last row sees."""
        cam = inp.cross_attention_mask
        if n_rows > cam.shape[1]:
            cam = torch.cat([cam, cam[:, -1:].expand(-1, n_rows - cam.shape[1], -1, -1)], dim=1)
        return _prepare_cross_attention_mask(cam, num_vision_tokens=self.n_pos, dtype=torch.float32)

    def candidates(self, inp: MllamaInputs) -> list:
        """Per image, its candidate state rows (real tiles only)."""
        t_max = inp.aspect_ratio_mask.shape[-1]
        return [[(i * t_max + t) * self.n_pos + p for t in range(n) for p in range(self.n_pos)]
                for i, n in enumerate(inp.n_tiles)]

    def cross_probs(self, layer, h: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities [n_head, S, n_states] of cross-attention layer `layer` for input h."""
        ca = layer.cross_attn
        x = layer.input_layernorm(h)
        b, s, _ = x.shape
        q = ca.q_norm(ca.q_proj(x).view(b, s, ca.num_heads, ca.head_dim).transpose(1, 2))
        k = ca.k_norm(ca.k_proj(states).view(b, -1, ca.num_key_value_heads, ca.head_dim).transpose(1, 2))
        k = repeat_kv(k, ca.num_key_value_groups)
        w = torch.matmul(q, k.transpose(2, 3)) * ca.scaling + mask
        return torch.softmax(w, dim=-1, dtype=torch.float32)[0]

    def select(self, trim: Trim, inp: MllamaInputs, probs: torch.Tensor, row_mask: torch.Tensor) -> Selection:
        n_prompt = inp.input_ids.shape[1]
        q_rows = torch.nonzero(row_mask[0, 0, :n_prompt, 0] == 1).flatten()
        cands = self.candidates(inp)
        n_states = probs.shape[-1]
        kept, per_image, groups = [], [], []
        score = probs[:, q_rows, :].mean(dim=1) if len(q_rows) else None   # [n_head, n_states]
        for rows in cands:
            n = len(rows)
            if score is None:
                kept += rows
                per_image.append((n, n))
                groups.append((rows, torch.zeros(1, n), n))
                continue
            s = score[:, rows]
            if trim.mode == "union":
                k = n_keep(trim.k_ratio, n)
                g = s
            else:
                k = n_keep(trim.keep, n)
                g = s.mean(dim=0, keepdim=True)
            chosen = set()
            for sh in g:
                order = sorted(range(n), key=lambda j: (-float(sh[j]), j))
                chosen.update(rows[j] for j in order[:k])
            kept += sorted(chosen)
            per_image.append((n, len(chosen)))
            groups.append((rows, g, k))
        return Selection(sorted(kept), sum(len(r) for r in cands), n_states, per_image, self.cross_layers[0],
                         groups)

    # ---- the decoder ----------------------------------------------------------------------------

    @torch.no_grad()
    def _decode(self, inp: MllamaInputs, ids: torch.Tensor, states: Optional[torch.Tensor],
                trim: Optional[Trim], kept: Optional[list]):
        """Last-row logits of ids (the prompt plus generated tokens) and the selection (made at L0 when
        trim is given and kept is None; `kept` fixes it)."""
        lm = self.lm
        n = ids.shape[1]
        pos = torch.arange(n)[None]
        h = lm.embed_tokens(ids)
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        rope = lm.rotary_emb(h, pos)
        mask = row_mask = None
        if states is not None:
            mask, row_mask = self._cross_mask(inp, n)
        sel = None
        idx = None if kept is None else torch.tensor(kept, dtype=torch.long)
        for il, layer in enumerate(lm.layers):
            kw = dict(attention_mask=causal, position_ids=pos, position_embeddings=rope, past_key_values=None)
            if il not in self.cross_layers:
                h = layer(h, **kw)
                continue
            if states is None:
                continue  # no image: HF skips the cross-attention layers
            first = il == self.cross_layers[0]
            if trim is not None and first and kept is None:
                probs = self.cross_probs(layer, h, states, mask)
                sel = self.select(trim, inp, probs, row_mask)
                idx = torch.tensor(sel.kept, dtype=torch.long)
            use_kept = idx is not None and (not first or (trim is not None and trim.trim_first_layer))
            s_l, m_l = (states[:, idx], mask[..., idx]) if use_kept else (states, mask)
            h = layer(h, cross_attention_states=s_l, cross_attention_mask=m_l,
                      full_text_row_masked_out_mask=row_mask, **kw)
        h = lm.norm(h)
        return self.model.lm_head(h[0, -1]).float(), sel

    @torch.no_grad()
    def run(self, inp: MllamaInputs, trim: Optional[Trim] = None, kept: Optional[list] = None) -> TrimResult:
        """Prefill logits. trim=None: nothing trimmed (HF's computation); kept: force this kept set."""
        if trim is not None:
            trim.check()
        logits, sel = self._decode(inp, inp.input_ids, self.states(inp), trim, kept)
        return TrimResult(logits, sel)

    @torch.no_grad()
    def greedy(self, inp: MllamaInputs, trim: Optional[Trim], n_new: int, kept: Optional[list] = None):
        """(tokens, margins, selection): n_new greedy tokens with the kept set fixed at the prefill, and the
        gap between the best and second-best logit at each step (for near-tie checks)."""
        states = self.states(inp)
        seq = inp.input_ids
        out, margins, sel = [], [], None
        for step in range(n_new):
            logits, s = self._decode(inp, seq, states, trim, kept)
            if step == 0 and trim is not None and kept is None:
                sel, kept = s, (s.kept if s is not None else None)
            top = torch.topk(logits, 2)
            nxt = int(top.indices[0])
            out.append(nxt)
            margins.append(float(top.values[0] - top.values[1]))
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        return out, margins, sel
