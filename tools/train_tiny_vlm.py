#!/usr/bin/env python3
"""Train a tiny LLaVA-style VLM (transformers LlavaForConditionalGeneration) on pyvtrim.synthvqa, on CPU or CUDA.

    python tools/train_tiny_vlm.py --out-dir runs/tiny --seed 0            # train, save HF dir + summary JSON
    python tools/train_tiny_vlm.py --out-dir runs/tiny --gguf pyvtrim/data/tiny-llava-synthvqa-f16.gguf

The model: a CLIP ViT (96 px, 8 px patches: 144 patches + CLS, width 128, 4 layers) -> LLaVA's 2-layer GELU
projector -> a Llama decoder (width 128, 4 layers, 4 heads) with the real Llama-2 vocabulary and tokenizer
(rebuilt from the pinned llama.cpp archive, as tests/fixtures.py does), "<image>" = 32000, "<pad>" = 32001.
Prompts are LLaVA-1.5's ("USER: <image>\\n<question> ASSISTANT:"); the answer is one token.

Staged recipe (end-to-end training from one answer token per example does not learn on this CPU budget; see
/work/shared/notes/tiny-vlm-training.md):
  1. the vision tower alone, with a dense per-patch objective from the generator's masks (colour, shape, size
     of the object under each patch, whether an object's centre is there, the patch's row and column);
  2. projector + decoder on the questions, tower frozen (answer-only loss);
  3. a short joint fine-tune of everything (answer loss + the dense loss, tower at a lower learning rate).
Optionally first (--steps0 / --minutes0 / --resume-stage0) stage 0: the decoder on symbolic image tokens (learned
rows of each patch's true labels), then stage 1c: the projector trained to produce those tokens from the tower.
Several questions about one image share a sequence as a tree (each sees the image and itself only).
AdamW, linear warm-up + cosine decay per stage. Held-out accuracy is measured on a different generator seed.
The summary JSON (``<out-dir>/train_summary.json``) records the seeds, steps, times and accuracies.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from tiny_vlm import (  # noqa: E402  (the model, its prompts and data)
    IMAGE_TOKEN_ID, PAD_TOKEN_ID, N_PATCHES,
    DEFAULTS, log, build_model, save_tokenizer_and_preprocessor,
    Prompts, normalize, scene_labels, Pool, SymbolicTokens,
)
from pyvtrim import synthvqa as sv  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Forward passes (the same arithmetic as LlavaModel with vision_feature_layer=-1, "default" select)
# ------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, model, prompts: Prompts, device, shape_weight: float = 1.0, tie_words: bool = False,
                 symbolic_joint: bool = False, tree: bool = False):
        import torch

        self.torch, self.model, self.prompts, self.device = torch, model, prompts, device
        self.shape_weight, self.tree = shape_weight, tree
        self.core = model.model
        def heads(d):
            return torch.nn.ModuleDict({
                "colour": torch.nn.Linear(d, sv.N_COLOUR_CLASSES), "shape": torch.nn.Linear(d, sv.N_SHAPE_CLASSES),
                "size": torch.nn.Linear(d, sv.N_SIZE_CLASSES), "centre": torch.nn.Linear(d, 2),
                "row": torch.nn.Linear(d, 12), "col": torch.nn.Linear(d, 12)}).to(device)

        self.heads = heads(model.config.vision_config.hidden_size)
        self.proj_heads = heads(model.config.text_config.hidden_size)  # on the projector's output (stage 1b)
        tie = None
        if tie_words:
            def word(w):
                i = prompts.tok.convert_tokens_to_ids("\u2581" + w)
                assert isinstance(i, int) and i != prompts.tok.unk_token_id, w
                return i

            tie = (model.model.language_model.embed_tokens,
                   {0: [word(c) for c in sv.COLOURS], 1: [word(x) for x in sv.SHAPES], 2: [word("small"), word("large")]})
        self.symbolic = SymbolicTokens(model.config.text_config.hidden_size, tie, joint=symbolic_joint).to(device)

    def vision_features(self, pixels):
        out = self.core.vision_tower(pixels, output_hidden_states=True)
        return out.hidden_states[-1][:, 1:]

    def dense_loss(self, feats, labels, heads=None):
        F = self.torch.nn.functional
        heads = self.heads if heads is None else heads
        loss, accs = 0.0, {}
        for j, name in enumerate(("colour", "shape", "size", "centre", "row", "col")):
            logits = heads[name](feats)
            y = labels[:, j]
            w = None
            if name == "centre":
                w = self.torch.tensor([1.0, 10.0], device=feats.device)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), weight=w)
            loss = loss + (self.shape_weight * ce if name == "shape" else ce)
            if name in ("colour", "shape"):
                fg = y > 0
                accs[name] = float((logits.argmax(-1)[fg] == y[fg]).float().mean()) if fg.any() else 1.0
        return loss, accs

    def answer_logits(self, feats, questions):
        """The logits after "ASSISTANT:" of single-question prompts (a pack of one question each)."""
        return self.packed_logits(feats, [[q] for q in questions])

    def packed_logits(self, feats, groups):
        """groups[b]: the questions about image b, asked one after another in one sequence (teacher-forced
        answers); the logits of each answer position, in order."""
        return self.packed_logits_from_tokens(self.core.multi_modal_projector(feats), groups)

    def packed_logits_from_tokens(self, img, groups):
        """packed_logits with the image tokens given ([B, 144, d]: the projector's output or symbolic tokens)."""
        if self.tree and any(len(g) > 1 for g in groups):
            return self.tree_logits_from_tokens(img, groups)
        torch = self.torch
        packs = [self.prompts.packed(g) for g in groups]
        T = max(len(p[0]) for p in packs)
        ids = torch.full((len(packs), T), PAD_TOKEN_ID, dtype=torch.long)
        rows, cols = [], []
        for b, (s, where) in enumerate(packs):
            ids[b, :len(s)] = torch.tensor(s)
            rows += [b] * len(where)
            cols += where
        ids = ids.to(self.device)
        lm = self.core.language_model
        emb = lm.embed_tokens(ids)
        emb = emb.masked_scatter((ids == IMAGE_TOKEN_ID).unsqueeze(-1), img.to(emb.dtype))
        h = lm(inputs_embeds=emb, use_cache=False).last_hidden_state
        h = h[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)]
        return self.model.lm_head(h)

    def tree_logits_from_tokens(self, img, groups):
        """Several questions about one image in one sequence, each as if asked alone: "<s>USER: <image>" once, then
        each question's "\n<question> ASSISTANT:" with an attention mask that lets it see the image and itself only,
        at the positions it has in a single-question prompt. The logits equal answer_logits' for every question
        (tests/test_train_tiny_vlm.py), at about the cost of one multi-turn sequence: no earlier question's words
        or answers to confuse the look-up, and no copying of a repeated question's answer."""
        torch = self.torch
        first = self.prompts.ids(groups[0][0].text)
        k = first.index(IMAGE_TOKEN_ID) + N_PATCHES  # BOS, "USER:", the image tokens
        rows_ids, rows_pos, rows_seg, rows, cols = [], [], [], [], []
        for b, g in enumerate(groups):
            ids, pos, seg = list(first[:k]), list(range(k)), [0] * k
            for j, q in enumerate(g):
                full = self.prompts.ids(q.text)
                assert full[:k] == first[:k], "the prompts share their prefix up to the image"
                tail = full[k:]
                ids += tail
                pos += range(k, k + len(tail))
                seg += [j + 1] * len(tail)
                rows.append(b)
                cols.append(len(ids) - 1)
            rows_ids.append(ids), rows_pos.append(pos), rows_seg.append(seg)
        T = max(len(r) for r in rows_ids)
        B = len(groups)
        ids = torch.full((B, T), PAD_TOKEN_ID, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        seg = torch.full((B, T), -1, dtype=torch.long)  # -1: padding
        for b in range(B):
            n = len(rows_ids[b])
            ids[b, :n] = torch.tensor(rows_ids[b])
            pos[b, :n] = torch.tensor(rows_pos[b])
            seg[b, :n] = torch.tensor(rows_seg[b])
        qi, ki = seg.unsqueeze(2), seg.unsqueeze(1)  # [B, T, 1], [B, 1, T]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        allowed = causal & ((ki == 0) | (ki == qi))
        allowed |= torch.eye(T, dtype=torch.bool)  # padding rows see themselves (no empty row)
        ids, pos = ids.to(self.device), pos.to(self.device)
        lm = self.core.language_model
        emb = lm.embed_tokens(ids)
        emb = emb.masked_scatter((ids == IMAGE_TOKEN_ID).unsqueeze(-1), img.to(emb.dtype))
        mask = torch.zeros((B, 1, T, T), dtype=emb.dtype)
        mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(emb.dtype).min)
        h = lm(inputs_embeds=emb, attention_mask=mask.to(self.device), position_ids=pos,
               use_cache=False).last_hidden_state
        h = h[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)]
        return self.model.lm_head(h)

    def answer_loss(self, logits, questions):
        y = self.torch.tensor([self.prompts.answer_ids[q.answer] for q in questions], device=self.device)
        loss = self.torch.nn.functional.cross_entropy(logits.float(), y)
        acc = float((logits.argmax(-1) == y).float().mean())
        return loss, acc

    def predict(self, images: np.ndarray, questions, batch: int = 64, labels: np.ndarray = None):
        """Argmax answer ids for uint8 images [B, H, W, 3] and their questions; with `labels` ([B, 6, 144]) the
        decoder reads symbolic tokens of the true per-patch labels instead (stage 0)."""
        torch = self.torch
        out = []
        with torch.no_grad():
            for i in range(0, len(questions), batch):
                groups = [[q] for q in questions[i:i + batch]]
                if labels is not None:
                    img = self.symbolic(torch.from_numpy(labels[i:i + batch].astype(np.int64)).to(self.device))
                else:
                    px = torch.from_numpy(normalize(images[i:i + batch])).to(self.device)
                    img = self.core.multi_modal_projector(self.vision_features(px))
                out.extend(self.packed_logits_from_tokens(img, groups).argmax(-1).tolist())
        return out

    def evaluate(self, ev, blank: bool = False, symbolic: bool = False):
        images = np.stack([sv.blank_image() if blank else s.image for s, _ in ev])
        labels = None
        if symbolic:
            labels = np.stack([scene_labels(sv.Scene(0, 0, im, [] if blank else s.objects,
                                                     np.full(im.shape[:2], -1, np.int16) if blank else s.object_map))
                               for im, (s, _) in zip(images, ev)])
        qs = [q for _, q in ev]
        pred = self.predict(images, qs, labels=labels)
        ok = [p == self.prompts.answer_ids[q.answer] for p, q in zip(pred, qs)]
        by_kind = {}
        for (_, q), c in zip(ev, ok):
            by_kind.setdefault(q.kind, []).append(c)
        return float(np.mean(ok)), {k: round(float(np.mean(v)), 4) for k, v in sorted(by_kind.items())}


def lr_at(step: int, total: int, warmup: int, peak: float, frac: float = None) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 5% of the peak; `frac` (0..1, the elapsed share
    of a time budget) replaces the step count's progress when the stage runs for a fixed time."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = frac if frac is not None else (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def run_stage(name, params_groups, steps, warmup, step_fn, log_every, evaluate=None, eval_every=0, seconds=0.0):
    """`steps` optimiser steps, or with seconds > 0 as many as fit in that wall-clock time (the cosine schedule
    then follows the elapsed time). Returns (seconds taken, steps done)."""
    import torch

    opt = torch.optim.AdamW(params_groups, weight_decay=0.01, betas=(0.9, 0.98))
    peaks = [g["lr"] for g in opt.param_groups]
    t0, hist, step = time.time(), [], 0
    t_warm = None
    while (step < steps) if seconds <= 0 else (time.time() - t0 < seconds):
        frac = None
        if seconds > 0 and step >= warmup:
            t_warm = t_warm or time.time()
            frac = (time.time() - t_warm) / max(1.0, seconds - (t_warm - t0))
        for g, peak in zip(opt.param_groups, peaks):
            g["lr"] = lr_at(step, steps, warmup, peak, frac)
        loss, info = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        hist.append((float(loss.detach()), info))
        step += 1
        last = step == steps if seconds <= 0 else time.time() - t0 >= seconds
        if step % log_every == 0 or last:
            recent = hist[-log_every:]
            keys = recent[-1][1].keys()
            avg = {k: round(float(np.mean([h[1][k] for h in recent])), 3) for k in keys}
            total = steps if seconds <= 0 else f"{seconds:.0f}s"
            log(f"{name} step {step}/{total} loss {np.mean([h[0] for h in recent]):.4f} {avg} "
                f"({(time.time() - t0) / step:.2f} s/step, lr {opt.param_groups[0]['lr']:.2e})")
        if evaluate and eval_every and step % eval_every == 0 and not last:
            evaluate(f"{name}@{step}")
    return time.time() - t0, step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0, help="training seed (weights, data)")
    ap.add_argument("--eval-seed", type=int, default=1000, help="generator seed of the held-out questions")
    ap.add_argument("--n-eval", type=int, default=600)
    ap.add_argument("--pool", type=int, default=16000, help="training scenes")
    ap.add_argument("--steps0", type=int, default=0,
                    help="stage 0: decoder steps on symbolic image tokens (the true per-patch labels) before the "
                         "tower exists; with it, stage 1c maps the tower's features onto those tokens")
    ap.add_argument("--minutes0", type=float, default=0.0, help="run stage 0 for this wall-clock time instead")
    ap.add_argument("--lr0", type=float, default=2e-3)
    ap.add_argument("--tie-words", type=int, default=0,
                    help="stage 0's colour, shape and size rows are the words' own embeddings (scaled)")
    ap.add_argument("--symbolic-joint", type=int, default=0,
                    help="stage 0's tokens also get one learned row per (colour, shape, size, centre) class, so a "
                         "conjunction (a blue triangle, a red object's centre) is one key")
    ap.add_argument("--resume-stage0", type=Path, default=None,
                    help="a stage0.pt (symbolic tokens, decoder, lm_head) to start from instead of running stage 0 "
                         "(--steps0 / --minutes0 then add more steps; give the same --symbolic-joint / --tie-words)")
    ap.add_argument("--tree-pack", type=int, default=1,
                    help="a pack's questions each see the image and themselves only, at single-question positions "
                         "(a 4-D attention mask; 0: the older multi-turn conversation, where later questions also "
                         "see the earlier ones and their answers)")
    ap.add_argument("--distinct-questions", type=int, default=1,
                    help="no question repeats an earlier one in its pack (a repeat is answered by copying)")
    ap.add_argument("--steps1c", type=int, default=400, help="projector steps onto the symbolic tokens (stage 1c)")
    ap.add_argument("--steps1", type=int, default=600)
    ap.add_argument("--steps2", type=int, default=1200)
    ap.add_argument("--steps3", type=int, default=300)
    ap.add_argument("--minutes2", type=float, default=0.0,
                    help="run stage 2 for this wall-clock time instead of --steps2 (the schedule follows the time)")
    ap.add_argument("--minutes3", type=float, default=0.0, help="the same for stage 3")
    ap.add_argument("--batch1", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="images per stage-2/3 step")
    ap.add_argument("--per-image", type=int, default=6, help="questions per image (turns of one sequence)")
    ap.add_argument("--lr1", type=float, default=2e-3)
    ap.add_argument("--shape-weight", type=float, default=1.0,
                    help="weight of the per-patch shape loss in the dense objective (shape is the slow one)")
    ap.add_argument("--lr2", type=float, default=2e-3)
    ap.add_argument("--lr3", type=float, default=5e-4)
    ap.add_argument("--curriculum", type=int, default=200,
                    help="stage-2 steps per curriculum level: scenes of <= --curriculum-start objects for the first "
                         "this many steps, one object more per such span after, then all scenes")
    ap.add_argument("--curriculum-start", type=int, default=3,
                    help="the first level's object cap (1: one object first, where the answer needs no search)")
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on CPU; on a shared 2-core machine 1 thread ran a decoder step 4.6x faster "
                         "than 2 (0.73 against 3.38 s with another job running; 0.5 s with 2 threads when idle)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--resume-stage1", type=Path, default=None, help="a stage-1 checkpoint (vision tower) to reuse")
    ap.add_argument("--init-from", type=Path, default=None, help="start from a saved model directory (continue)")
    ap.add_argument("--warmup2", type=int, default=150)
    ap.add_argument("--steps1b", type=int, default=100, help="projector-only dense steps")
    ap.add_argument("--center", type=int, default=1, help="centre the projector output after stage 1b")
    ap.add_argument("--init-std", type=float, default=0.0,
                    help="re-initialise the projector's and decoder's matrices with this std (0: transformers' "
                         "0.02, which at width 128 leaves attention near uniform for hundreds of steps)")
    ap.add_argument("--only-stage1", action="store_true", help="stop after stage 1 (saves stage1.pt)")
    ap.add_argument("--train-embeddings", type=int, default=0,
                    help="train the token embedding in stages 2-3 (its 32064 x d rows make AdamW's step slow; "
                         "the few question words are told apart by their random rows as they are)")
    ap.add_argument("--gguf", type=Path, default=None, help="also convert the result to this GGUF")
    ap.add_argument("--outtype", default="f16", choices=("f32", "f16", "q8_0"))
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.manual_seed(args.seed)
    hp = dict(DEFAULTS)
    model = build_model(hp).to(device)
    if args.init_std > 0:
        reinit([model.model.multi_modal_projector, model.model.language_model, model.lm_head], args.init_std)
    save_tokenizer_and_preprocessor(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    prompts = Prompts(tok)
    trainer = Trainer(model, prompts, device, shape_weight=args.shape_weight, tie_words=bool(args.tie_words),
                      symbolic_joint=bool(args.symbolic_joint), tree=bool(args.tree_pack))
    log(f"device {device}; params {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M; building the pool")
    pool = Pool(args.seed, args.pool, cache=out.parent / "pool-cache", distinct=bool(args.distinct_questions))
    ev = sv.held_out(args.eval_seed, args.n_eval)
    log(f"pool of {args.pool} scenes, {len(ev)} held-out questions (seed {args.eval_seed})")
    summary = dict(seed=args.seed, eval_seed=args.eval_seed, n_eval=args.n_eval, pool=args.pool, device=str(device),
                   threads=args.threads, hparams=hp, args={k: str(v) for k, v in vars(args).items()}, evals={})

    def evaluate(tag):
        model.eval()
        acc, kinds = trainer.evaluate(ev)
        model.train()
        summary["evals"][tag] = dict(accuracy=round(acc, 4), by_kind=kinds)
        log(f"eval {tag}: held-out accuracy {acc:.4f} {kinds}")
        if "@" in tag:  # a checkpoint to fall back on if the run is cut short
            model.save_pretrained(str(out / "checkpoint"), safe_serialization=True)
            (out / "checkpoint" / "train_summary.json").write_text(json.dumps(summary, indent=2))
        return acc

    vt = model.model.vision_tower
    proj, lm, head = model.model.multi_modal_projector, model.model.language_model, model.lm_head
    model.train()
    lm.embed_tokens.weight.requires_grad_(bool(args.train_embeddings))
    lm_params = [p for p in lm.parameters() if p.requires_grad]

    def objects_cap(step):
        if args.curriculum <= 0:
            return sv.MAX_OBJECTS
        return min(sv.MAX_OBJECTS, args.curriculum_start + step // args.curriculum)

    # Stage 0: the decoder learns to answer from symbolic image tokens (clean keys, no tower in the loop).
    s0_steps = [0]

    def step0(step):
        s0_steps[0] += 1
        idx, _, groups = pool.batch_groups(args.batch, args.per_image, max_objects=objects_cap(step))
        img = trainer.symbolic(torch.from_numpy(pool.labels[idx].astype(np.int64)).to(device))
        qs = [q for g in groups for q in g]
        loss, acc = trainer.answer_loss(trainer.packed_logits_from_tokens(img, groups), qs)
        return loss, {"acc": acc}

    def evaluate_symbolic(tag):
        model.eval()
        acc, kinds = trainer.evaluate(ev, symbolic=True)
        model.train()
        summary["evals"][tag] = dict(accuracy=round(acc, 4), by_kind=kinds, image_tokens="symbolic")
        log(f"eval {tag} (symbolic image tokens): held-out accuracy {acc:.4f} {kinds}")
        torch.save({"symbolic": trainer.symbolic.state_dict(), "lm": lm.state_dict(), "head": head.state_dict(),
                    "steps": s0_steps[0]}, out / "stage0.pt")
        return acc

    if args.resume_stage0:
        sd = torch.load(args.resume_stage0, map_location=device)
        trainer.symbolic.load_state_dict(sd["symbolic"])
        lm.load_state_dict(sd["lm"])
        head.load_state_dict(sd["head"])
        s0_steps[0] = sd.get("steps") or 0
        summary["stage0_resumed"] = dict(path=str(args.resume_stage0), steps=sd.get("steps"))
        log(f"stage 0 from {args.resume_stage0} (steps {sd.get('steps')})")
        evaluate_symbolic("stage0_resumed")
    symbolic = args.steps0 > 0 or args.minutes0 > 0 or args.resume_stage0 is not None
    if args.steps0 > 0 or args.minutes0 > 0:
        t0s, n0 = run_stage("stage0", [{"params": list(trainer.symbolic.parameters()) + lm_params +
                                        list(head.parameters()), "lr": args.lr0}], args.steps0, args.warmup2,
                            step0, 50, evaluate_symbolic, args.eval_every, seconds=60.0 * args.minutes0)
        summary["stage0"] = dict(steps=n0, minutes_budget=args.minutes0, seconds=round(t0s, 1), batch=args.batch,
                                 per_image=args.per_image, curriculum=args.curriculum,
                                 curriculum_start=args.curriculum_start)
        evaluate_symbolic("stage0")

    # Stage 1: the vision tower on the dense per-patch objective.
    def step1(step):
        _, px, lab = pool.batch_images(args.batch1)
        feats = trainer.vision_features(torch.from_numpy(px).to(device))
        return trainer.dense_loss(feats, torch.from_numpy(lab).to(device))

    t1 = 0.0
    if args.init_from:  # continue from a saved model (the stage-1 file then gives the dense heads only)
        from transformers import LlavaForConditionalGeneration

        prev = LlavaForConditionalGeneration.from_pretrained(str(args.init_from))
        model.load_state_dict(prev.state_dict())
        del prev
        prev_summary = args.init_from / "train_summary.json"
        if prev_summary.is_file():
            summary["continued_from"] = json.loads(prev_summary.read_text())
        log(f"weights from {args.init_from}")
    if args.resume_stage1:
        sd = torch.load(args.resume_stage1, map_location=device)
        if not args.init_from:
            vt.load_state_dict(sd["tower"])
        trainer.heads.load_state_dict(sd["heads"])
        log(f"stage 1 from {args.resume_stage1} (steps {sd.get('steps')}, {sd.get('seconds')} s); "
            f"{args.steps1} more steps")
        summary["stage1_resumed"] = dict(path=str(args.resume_stage1), steps=sd.get("steps"),
                                         seconds=sd.get("seconds"))
    if args.steps1 > 0:
        t1, _ = run_stage("stage1", [{"params": list(vt.parameters()) + list(trainer.heads.parameters()),
                                   "lr": args.lr1}], args.steps1, min(100, args.steps1 // 5 + 1), step1, 50)
        prev = summary.get("stage1_resumed", {})
        torch.save({"tower": vt.state_dict(), "heads": trainer.heads.state_dict(),
                    "steps": (prev.get("steps") or 0) + args.steps1, "seconds": (prev.get("seconds") or 0) + t1},
                   out / "stage1.pt")
        if args.only_stage1:
            return 0
    summary["stage1"] = dict(steps=args.steps1, seconds=round(t1, 1), batch=args.batch1)

    # Stage 1b: the projector alone on the same dense objective (tower frozen), then centred: the image
    # tokens the decoder sees carry the per-patch facts linearly and share no large common component.
    for p in vt.parameters():
        p.requires_grad_(False)

    def step1b(step):
        _, px, lab = pool.batch_images(args.batch1)
        with torch.no_grad():
            feats = trainer.vision_features(torch.from_numpy(px).to(device))
        return trainer.dense_loss(proj(feats), torch.from_numpy(lab).to(device), trainer.proj_heads)

    # Stage 1c (after stage 0): the projector learns to produce the symbolic tokens from the tower's features,
    # so the decoder of stage 0 reads real images at once.
    for p in trainer.symbolic.parameters():
        p.requires_grad_(False)

    def step1c(step):
        _, px, lab = pool.batch_images(args.batch1)
        with torch.no_grad():
            feats = trainer.vision_features(torch.from_numpy(px).to(device))
            target = trainer.symbolic(torch.from_numpy(lab).to(device))
        y = proj(feats)
        loss = (y - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()
        return loss, {"rel_err": float(loss.detach())}

    t1b = 0.0
    if symbolic and not args.init_from:
        t1b, _ = run_stage("stage1c", [{"params": list(proj.parameters()), "lr": args.lr1}], args.steps1c, 20,
                           step1c, 25)
        evaluate("stage1c")
    elif args.steps1b > 0 and not args.init_from:
        t1b, _ = run_stage("stage1b", [{"params": list(proj.parameters()) + list(trainer.proj_heads.parameters()),
                                    "lr": args.lr1}], args.steps1b, 20, step1b, 25)
    if args.center and not args.init_from and not symbolic:
        with torch.no_grad():
            _, px, _ = pool.batch_images(64)
            y = proj(trainer.vision_features(torch.from_numpy(px).to(device))).reshape(-1, proj.linear_2.out_features)
            mu = y.mean(0)
            ratio = float(mu.norm() / y.sub(mu).pow(2).sum(-1).mean().sqrt())
            proj.linear_2.bias.sub_(mu)
        log(f"projector output centred: |mean| / rms deviation was {ratio:.3f}")
        summary["projector_mean_to_spread_before_centring"] = round(ratio, 4)
    summary["stage1c" if symbolic else "stage1b"] = dict(
        steps=0 if args.init_from else (args.steps1c if symbolic else args.steps1b), seconds=round(t1b, 1))

    # Stage 2: projector + decoder on the questions, tower frozen.

    def step2(step):
        mo = sv.MAX_OBJECTS if symbolic else objects_cap(step)  # stage 0 ran the curriculum
        _, px, groups = pool.batch_groups(args.batch, args.per_image, max_objects=mo)
        with torch.no_grad():
            feats = trainer.vision_features(torch.from_numpy(px).to(device))
        qs = [q for g in groups for q in g]
        loss, acc = trainer.answer_loss(trainer.packed_logits(feats, groups), qs)
        return loss, {"acc": acc}

    t2, n2 = run_stage("stage2", [{"params": list(proj.parameters()) + lm_params + list(head.parameters()),
                                   "lr": args.lr2}], args.steps2, args.warmup2, step2, 50, evaluate, args.eval_every,
                       seconds=60.0 * args.minutes2)
    summary["stage2"] = dict(steps=n2, minutes_budget=args.minutes2, seconds=round(t2, 1), batch=args.batch,
                             per_image=args.per_image,
                             curriculum=args.curriculum, curriculum_start=args.curriculum_start)
    evaluate("stage2")
    model.save_pretrained(str(out), safe_serialization=True)  # a usable checkpoint if stage 3 is cut short
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))

    # Stage 3: joint fine-tune (answer loss + dense loss), tower at a tenth of the rate.
    for p in vt.parameters():
        p.requires_grad_(True)

    def step3(step):
        idx, px, groups = pool.batch_groups(args.batch, args.per_image)
        feats = trainer.vision_features(torch.from_numpy(px).to(device))
        qs = [q for g in groups for q in g]
        loss, acc = trainer.answer_loss(trainer.packed_logits(feats, groups), qs)
        dl, _ = trainer.dense_loss(feats, torch.from_numpy(pool.labels[idx].astype(np.int64)).to(device))
        return loss + 0.1 * dl, {"acc": acc}

    t3, n3 = 0.0, 0
    if args.steps3 > 0 or args.minutes3 > 0:
        t3, n3 = run_stage("stage3", [
            {"params": list(vt.parameters()) + list(trainer.heads.parameters()), "lr": args.lr3 * 0.1},
            {"params": list(proj.parameters()) + lm_params + list(head.parameters()), "lr": args.lr3}],
            args.steps3, 30, step3, 50, seconds=60.0 * args.minutes3)
    summary["stage3"] = dict(steps=n3, minutes_budget=args.minutes3, seconds=round(t3, 1), batch=args.batch,
                             per_image=args.per_image)

    model.eval()
    acc = evaluate("final")
    blank_acc, blank_kinds = trainer.evaluate(ev, blank=True)
    summary.update(final_accuracy=round(acc, 4), blank_image_accuracy=round(blank_acc, 4),
                   blank_by_kind=blank_kinds, **baselines(pool, ev, prompts))
    summary["train_seconds"] = round(time.time() - t_start, 1)
    log(f"final {acc:.4f}; blank image {blank_acc:.4f}; majority {summary['majority_accuracy']:.4f}; "
        f"per-question majority {summary['question_majority_accuracy']:.4f}")

    model.save_pretrained(str(out), safe_serialization=True)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if args.gguf:
        from pyvtrim.conversion import convert

        args.gguf.parent.mkdir(parents=True, exist_ok=True)
        convert(out, args.gguf, outtype=args.outtype)
        log(f"wrote {args.gguf} ({args.gguf.stat().st_size / 2**20:.1f} MiB)")
    return 0


def reinit(modules, std: float) -> None:
    """Every Linear / Embedding weight ~ N(0, std), biases 0 (norm weights stay 1)."""
    import torch

    with torch.no_grad():
        for mod in modules:
            for m in mod.modules() if isinstance(mod, torch.nn.Module) else []:
                if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                    m.weight.normal_(0.0, std)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()


def baselines(pool: Pool, ev, prompts) -> dict:
    """Accuracy of image-blind answers on the held-out set: the most frequent answer overall, and the most
    frequent answer of each question text (both counted on training-seed questions)."""
    from collections import Counter, defaultdict

    overall, per_q = Counter(), defaultdict(Counter)
    rng = np.random.default_rng(7)
    for i in rng.integers(0, pool.n, 20000):
        q = sv.questions(pool.scene(int(i)), 1, seed=int(rng.integers(1 << 30)))[0]
        overall[q.answer] += 1
        per_q[q.text][q.answer] += 1
    maj = overall.most_common(1)[0][0]
    qm = [per_q[q.text].most_common(1)[0][0] if per_q[q.text] else maj for _, q in ev]
    return dict(majority_answer=maj,
                majority_accuracy=round(float(np.mean([q.answer == maj for _, q in ev])), 4),
                question_majority_accuracy=round(float(np.mean([q.answer == a for (_, q), a in zip(ev, qm)])), 4))


if __name__ == "__main__":
    sys.exit(main())
