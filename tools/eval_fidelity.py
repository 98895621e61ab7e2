#!/usr/bin/env python3
"""Fidelity of visual-token reductions on the trained tiny VLM: accuracy on fresh synthetic questions.

    python tools/eval_fidelity.py --seed 2000 --n 1000 --out bench/results/fidelity.json
    python tools/eval_fidelity.py --configs unreduced,fastv:2:0.5,random:2:0.5 --n 300 --out f.json

The questions come from pyvtrim.synthvqa with --seed (use one the model was not trained on; training used 0,
its held-out checks 1000). Each row: {model, method, params, engine, accuracy, ci95, retention, image_tokens_kept,
n}; retention = accuracy / unreduced accuracy; ci95 is Wilson's interval.

Configs:
  unreduced            the runtime (pyvtrim.Model), no reduction
  blank                the runtime, the image replaced by a blank one ("image removed")
  fastv:K:R            the runtime with pyvtrim.FastV(k=K, ratio=R)
  random:K:R           RANDOM pruning at FastV's budget: layers < K see every token, then int((1-R)*N) image
                       tokens chosen uniformly at random are kept (original positions), --random-seeds seeds.
                       The runtime has no random policy, so this row runs in PyTorch on the HF checkpoint
                       (--hf-dir) with the FastV reference of the tests (tests/reference/fastv_reference.py) given random
                       kept rows; engine "transformers". The "fastv-ref:K:R" config runs FastV the same way, to
                       show the two engines agree.
  random-n:K:T         RANDOM pruning keeping T image tokens after layer K (K = 0: before the decoder), the
                       baseline of the methods that give a token count (FiCoCo at N/3, N/6, N/9 = 48, 24, 16).
  hf                   transformers' LlavaForConditionalGeneration unreduced (engine "transformers"); the row
                       also reports how often its answer equals the runtime's ("agreement_with_runtime").
  ficoco-v:T[:S]       pyvtrim.FiCoCoV(tokens=T, start_layer=S) (S default 0: this tower has 3 layers)
  ficoco-l:T           pyvtrim.FiCoCoL(tokens=T)
  vlcache:B            pyvtrim.VLCache(budget=B). VL-Cache shrinks the KV cache after the prefill, for decoding;
                       so the prompt's last token is not prefilled but decoded: prefill all but "ASSISTANT:"'s
                       last piece (with the policy), then decode that piece on the kept cache; its logits answer.
  A config whose policy class this pyvtrim does not have (yet) is skipped with a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "reference"))
sys.path.insert(0, str(REPO / "tests" / "support"))
sys.path.insert(0, str(REPO / "tools"))

from pyvtrim import synthvqa as sv  # noqa: E402

DEFAULT_MODEL = REPO / "pyvtrim" / "data" / "tiny-llava-synthvqa.gguf"
DEFAULT_CONFIGS = ("unreduced,blank,hf,fastv:2:0.5,fastv:2:0.75,fastv:2:0.9,"
                   "random:2:0.5,random:2:0.75,random:2:0.9")
N_IMAGE = 144


def wilson(k: int, n: int, z: float = 1.96):
    if n == 0:
        return [0.0, 0.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(c - h, 4), round(c + h, 4)]


class Runtime:
    def __init__(self, path: Path, threads: int):
        import pyvtrim

        self.pyvtrim = pyvtrim
        self.m = pyvtrim.Model(str(path), n_ctx=512, n_threads=threads)
        self.answer_ids = {w: self.m.tokenize(sv.prompt("x") + " " + w, add_special=True)[-1]
                           for w in sv.ANSWER_WORDS}

    def answers(self, qa, reduce=None, blank=False, decode_last=False):
        """decode_last: prefill all but the last token (with reduce), then decode it (after-prefill policies)."""
        preds, kept = [], []
        for s, q in qa:
            toks = self.m.tokenize(sv.prompt(q.text))
            img = sv.blank_image() if blank else s.image
            if decode_last:
                self.m.prefill(toks[:-1], [img], reduce=reduce)
                logits = self.m.decode(toks[-1])
            else:
                logits = self.m.forward(toks, [img], reduce=reduce)
            preds.append(int(np.argmax(logits)))
            kept.append(self.m.last_stats.get("n_image_tokens_kept", N_IMAGE))
        return preds, kept


def policy(name: str, **kw):
    """pyvtrim.<name>(**kw), or None (with a message) when this pyvtrim has no such policy yet."""
    import pyvtrim

    cls = getattr(pyvtrim, name, None)
    if cls is None:
        print(f"skipping: pyvtrim has no {name} (not implemented in this build)", file=sys.stderr)
        return None
    try:
        return cls(**kw)
    except TypeError as e:
        print(f"skipping: pyvtrim.{name}({kw}) does not take these parameters: {e}", file=sys.stderr)
        return None


class Reference:
    """transformers' model from --hf-dir; the FastV reference of the tests for pruned forwards."""

    def __init__(self, hf_dir: Path, threads: int):
        import torch
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        from fastv_reference import FastVReference
        from tiny_vlm import N_PATCHES, normalize

        def expand_prompt(ids):
            k = ids.index(self.model.config.image_token_id)
            return ids[:k] + [ids[k]] * N_PATCHES + ids[k + 1:]

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
        self.tok = AutoTokenizer.from_pretrained(str(hf_dir))
        self.ref = FastVReference(self.model, self.model.config.image_token_id)
        self.expand, self.normalize = expand_prompt, normalize

    def inputs(self, s, q):
        ids = self.expand(self.tok(sv.prompt(q.text))["input_ids"])
        return self.torch.tensor([ids]), self.torch.from_numpy(self.normalize(s.image[None]))

    def answers(self, qa):
        """transformers' own forward, unreduced (random_pruned with ratio 0 is the same arithmetic)."""
        out = []
        with self.torch.no_grad():
            for s, q in qa:
                ids, px = self.inputs(s, q)
                out.append(int(self.model(input_ids=ids, pixel_values=px, logits_to_keep=1).logits[0, -1].argmax()))
        return out

    def pruned(self, qa, k: int, ratio: float, rng=None):
        """FastV's ranking (rng None, one question at a time) or random kept rows (rng, batched) at the
        budget int((1 - ratio) * N)."""
        if rng is not None:
            return self.random_pruned(qa, k, ratio, rng)
        out = []
        for s, q in qa:
            ids, px = self.inputs(s, q)
            kept = self.ref.select(ids, px, k, ratio, "last")
            logits = self.ref.logits(ids, px, k, kept, ids.shape[1])
            out.append(int(logits.argmax()))
        return out

    def random_pruned(self, qa, k: int, ratio: float, rng, batch: int = 32, n_keep=None):
        """Batched: layers < k on every row, then each question keeps int((1 - ratio) * N) random image rows
        (and every text row) at their original positions for layers >= k. The same arithmetic as the FastV
        reference's logits() with random kept rows (prompts right-padded; padding comes after the last row)."""
        torch = self.torch
        from fastv_reference import _causal

        lm, img_id, out = self.ref.lm, self.model.config.image_token_id, []
        with torch.no_grad():
            for b0 in range(0, len(qa), batch):
                chunk = qa[b0:b0 + batch]
                seqs = [self.expand(self.tok(sv.prompt(q.text))["input_ids"]) for _, q in chunk]
                T = max(map(len, seqs))
                ids = torch.full((len(seqs), T), self.model.config.text_config.pad_token_id or 0, dtype=torch.long)
                for i, sq in enumerate(seqs):
                    ids[i, :len(sq)] = torch.tensor(sq)
                px = torch.from_numpy(self.normalize(np.stack([sc.image for sc, _ in chunk])))
                h = self.ref.embed(ids, px)
                pos = torch.arange(T)
                cos_sin = lm.rotary_emb(h, pos[None].expand(len(seqs), T))
                mask = _causal(pos, pos)
                for layer in lm.layers[:k]:
                    h = layer(h, attention_mask=mask, position_ids=pos[None], position_embeddings=cos_sin)
                rows = [i for i, t in enumerate(seqs[0]) if t == img_id]  # the same span in every prompt
                if n_keep is None:
                    n_keep = int(math.floor((1.0 - ratio) * len(rows) + 1e-6))
                keep_idx = []
                for sq in seqs:
                    assert [i for i, t in enumerate(sq) if t == img_id] == rows
                    kept = set(rng.choice(rows, n_keep, replace=False).tolist())
                    keep_idx.append([i for i in range(T) if i not in set(rows) or i in kept])
                kt = torch.tensor(keep_idx)
                h = torch.gather(h, 1, kt[..., None].expand(-1, -1, h.shape[-1]))
                n2 = kt.shape[1]
                cos_sin = lm.rotary_emb(h, kt)
                mask = _causal(torch.arange(n2), torch.arange(n2))
                for layer in lm.layers[k:]:
                    h = layer(h, attention_mask=mask, position_ids=kt, position_embeddings=cos_sin)
                h = lm.norm(h)
                last = torch.tensor([len(sq) - 1 - (len(rows) - n_keep) for sq in seqs])
                logits = self.model.lm_head(h[torch.arange(len(seqs)), last])
                out.extend(logits.argmax(-1).tolist())
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the GGUF (default: the shipped one)")
    ap.add_argument("--hf-dir", type=Path, default=None, help="the HF checkpoint (for hf / random / fastv-ref rows)")
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    qa = sv.held_out(args.seed, args.n)
    gold_words = [q.answer for _, q in qa]
    rt = Runtime(args.model, args.threads)
    gold = np.array([rt.answer_ids[w] for w in gold_words])
    ref = None
    rows, unreduced_acc, runtime_preds = [], None, None
    name = args.model.name

    def row(method, params, engine, preds, kept, extra=None):
        ok = np.array(preds) == gold
        r = dict(model=name, method=method, params=params, engine=engine, n=len(ok),
                 accuracy=round(float(ok.mean()), 4), ci95=wilson(int(ok.sum()), len(ok)),
                 retention=None, image_tokens_kept=float(np.mean(kept)))
        if extra:
            r.update(extra)
        rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    for cfg in [c.strip() for c in args.configs.split(",") if c.strip()]:
        t0 = time.time()
        parts = cfg.split(":")
        kind = parts[0]
        if kind in ("hf", "random", "random-n", "fastv-ref", "random-check") and ref is None:
            if args.hf_dir is None:
                print(f"skipping {cfg}: needs --hf-dir", file=sys.stderr)
                continue
            ref = Reference(args.hf_dir, args.threads)
        if kind == "unreduced":
            runtime_preds, kept = rt.answers(qa)
            unreduced_acc = row("unreduced", {}, "pyvtrim", runtime_preds, kept)["accuracy"]
        elif kind == "blank":
            p, kept = rt.answers(qa, blank=True)
            row("image removed (blank image)", {}, "pyvtrim", p, [0] * len(p))
        elif kind == "fastv":
            k, r = int(parts[1]), float(parts[2])
            p, kept = rt.answers(qa, reduce=rt.pyvtrim.FastV(k=k, ratio=r))
            row("fastv", dict(k=k, ratio=r), "pyvtrim", p, kept)
        elif kind == "hf":
            p = ref.answers(qa)
            extra = None
            if runtime_preds is not None:
                extra = dict(agreement_with_runtime=round(float(np.mean(np.array(p) == np.array(runtime_preds))), 4))
            row("unreduced", {}, "transformers", p, [N_IMAGE] * len(p), extra)
        elif kind == "random-check":  # the batched random path with nothing dropped == transformers' answers
            p = ref.random_pruned(qa, 2, 0.0, np.random.default_rng(0))
            row("random (ratio 0: nothing dropped)", dict(k=2, ratio=0.0), "transformers", p, [N_IMAGE] * len(p),
                dict(agreement_with_runtime=round(float(np.mean(np.array(p) == np.array(runtime_preds))), 4))
                if runtime_preds is not None else None)
        elif kind == "fastv-ref":
            k, r = int(parts[1]), float(parts[2])
            p = ref.pruned(qa, k, r)
            row("fastv", dict(k=k, ratio=r), "transformers", p, [int((1 - r) * N_IMAGE + 1e-6)] * len(p))
        elif kind in ("ficoco-v", "ficoco-l", "vlcache"):
            if kind == "vlcache":
                params = dict(budget=float(parts[1]))
                pol = policy("VLCache", **params)
            else:
                params = dict(tokens=int(parts[1]))
                if kind == "ficoco-v":
                    params["start_layer"] = int(parts[2]) if len(parts) > 2 else 0
                pol = policy("FiCoCoV" if kind == "ficoco-v" else "FiCoCoL", **params)
            if pol is None:
                continue
            p, kept = rt.answers(qa, reduce=pol, decode_last=kind == "vlcache")
            row(kind, params, "pyvtrim", p, kept)
        elif kind in ("random", "random-n"):
            k = int(parts[1])
            if kind == "random":
                r, n_keep = float(parts[2]), None
                params = dict(k=k, ratio=r, seeds=args.random_seeds)
                n_kept = int((1 - r) * N_IMAGE + 1e-6)
            else:
                r, n_keep = 0.0, int(parts[2])
                params = dict(k=k, tokens=n_keep, seeds=args.random_seeds)
                n_kept = n_keep
            accs, allp = [], []
            for rs in range(args.random_seeds):
                p = ref.random_pruned(qa, k, r, np.random.default_rng([args.seed, rs]), n_keep=n_keep)
                accs.append(float(np.mean(np.array(p) == gold)))
                allp += p
            ok = np.array(allp) == np.tile(gold, args.random_seeds)
            r_ = dict(model=name, method="random", params=params,
                      engine="transformers", n=len(qa), accuracy=round(float(np.mean(accs)), 4),
                      ci95=wilson(int(ok.sum()), len(ok)), per_seed=[round(a, 4) for a in accs],
                      retention=None, image_tokens_kept=float(n_kept))
            rows.append(r_)
            print(json.dumps(r_), flush=True)
        else:
            raise SystemExit(f"unknown config {cfg!r}")
        print(f"  ({cfg}: {time.time() - t0:.1f} s)", file=sys.stderr, flush=True)

    if unreduced_acc:
        for r in rows:
            r["retention"] = round(r["accuracy"] / unreduced_acc, 4)
    from collections import Counter

    maj, cnt = Counter(gold_words).most_common(1)[0]
    per_q = {}
    for _, q in qa:
        per_q.setdefault(q.text, Counter())[q.answer] += 1
    qmaj = sum(c.most_common(1)[0][1] for c in per_q.values()) / len(qa)
    res = dict(seed=args.seed, n=args.n, model=str(args.model), majority_answer=maj,
               majority_accuracy=round(cnt / len(gold_words), 4),
               # the best any image-blind answerer that reads the question could do on these questions
               # (the most frequent answer of each question text, counted on this set itself)
               question_majority_accuracy=round(qmaj, 4), rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
