"""SentencePiece (Llama-1/2 style) vocabularies for GGUF, as llama.cpp's "llama" tokenizer reads them.

Sources, in order of preference:
  * tokenizer.model (a SentencePiece ModelProto): pieces, scores and types as they are;
  * tokenizer.json alone, when it is a SentencePiece-style BPE (byte_fallback, "▁" for spaces):
    its merges give the scores (score = -rank of the first merge producing the piece, which
    makes llama.cpp's highest-score-first merging pick the same pairs as HF's lowest-rank-first);
  * a GGUF that already holds a vocabulary (the demo model uses the archive's Llama-2 vocab).
Added tokens (added_tokens.json, tokenizer_config.json's added_tokens_decoder, tokenizer.json's
added_tokens) are placed at their ids: special ones as CONTROL, others as USER_DEFINED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .base import ConversionError, read_json

# SentencePiece's piece types; GGUF's tokenizer.ggml.token_type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

ADDED_TOKEN_SCORE = -1000.0
PAD_TOKEN_SCORE = -1000.0
SPACE = "\u2581"  # "▁", SentencePiece's visible space


@dataclass
class Vocab:
    tokens: List[str]
    scores: List[float]
    types: List[int]
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    unk_id: Optional[int] = None
    pad_id: Optional[int] = None
    add_bos: bool = True
    add_eos: bool = False
    chat_template: Optional[str] = None
    source: str = ""
    _index: Dict[str, int] = field(default_factory=dict, repr=False)

    def __len__(self):
        return len(self.tokens)

    def id_of(self, text: str) -> Optional[int]:
        if len(self._index) != len(self.tokens):
            self._index = {}
            for i, t in enumerate(self.tokens):
                self._index.setdefault(t, i)
        return self._index.get(text)

    def set_token(self, tid: int, text: str, special: bool) -> None:
        """Place an added token at its id (growing the vocab with [PAD] fillers if needed)."""
        if tid < 0:
            raise ConversionError(f"added token {text!r} has a negative id {tid}")
        if tid >= len(self.tokens):
            self.pad_to(tid + 1)
        base_type = self.types[tid]
        same = self.tokens[tid] == text
        if same and base_type in (UNKNOWN, CONTROL, BYTE):
            return  # <unk>, <s>, </s> listed again as added tokens: keep what the model says
        self.tokens[tid] = text
        self.scores[tid] = ADDED_TOKEN_SCORE
        self.types[tid] = CONTROL if special else USER_DEFINED
        self._index = {}

    def pad_to(self, n: int) -> None:
        """Fill ids len..n-1 with "[PAD{id}]" UNUSED tokens (the embedding has more rows)."""
        for tid in range(len(self.tokens), n):
            self.tokens.append(f"[PAD{tid}]")
            self.scores.append(PAD_TOKEN_SCORE)
            self.types.append(UNUSED)
        self._index = {}

    def fit_to(self, n_vocab: int, where: str) -> None:
        if len(self.tokens) > n_vocab:
            raise ConversionError(
                f"{where}: the tokenizer has {len(self.tokens)} tokens but the embedding only {n_vocab} rows")
        self.pad_to(n_vocab)

    def add_to_gguf(self, w) -> None:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(self.tokens)
        w.add_token_scores([float(s) for s in self.scores])
        w.add_token_types([int(t) for t in self.types])
        for key, tid in (("bos", self.bos_id), ("eos", self.eos_id), ("unk", self.unk_id), ("pad", self.pad_id)):
            if tid is None:
                continue
            if not 0 <= tid < len(self.tokens):
                raise ConversionError(f"{key} token id {tid} is outside the vocabulary ({len(self.tokens)} tokens)")
            getattr(w, f"add_{key}_token_id")(int(tid))
        w.add_add_bos_token(bool(self.add_bos))
        w.add_add_eos_token(bool(self.add_eos))
        if self.chat_template:
            w.add_chat_template(self.chat_template)


# ------------------------------------------------------------------------------------------------
# Base vocabularies
# ------------------------------------------------------------------------------------------------


def vocab_from_spm_model(path: Path) -> Vocab:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise ConversionError(f"{path}: reading it needs the sentencepiece and protobuf packages "
                              "(pip install 'pyvtrim[convert]')") from e
    try:
        m = pb.ModelProto.FromString(Path(path).read_bytes())
    except Exception as e:  # protobuf raises DecodeError, OSError for unreadable files
        raise ConversionError(f"{path}: not a SentencePiece model: {e}") from e
    if len(m.pieces) == 0:
        raise ConversionError(f"{path}: SentencePiece model has no pieces")
    if m.trainer_spec.model_type != pb.TrainerSpec.BPE:
        kind = pb.TrainerSpec.ModelType.Name(m.trainer_spec.model_type)
        raise ConversionError(f"{path}: SentencePiece model type {kind} is not supported (Llama uses BPE)")
    v = Vocab(tokens=[p.piece for p in m.pieces], scores=[float(p.score) for p in m.pieces],
              types=[int(p.type) for p in m.pieces], source=str(path))
    ts = m.trainer_spec
    n = len(v.tokens)
    v.unk_id = ts.unk_id if 0 <= ts.unk_id < n else None
    v.bos_id = ts.bos_id if 0 <= ts.bos_id < n else None
    v.eos_id = ts.eos_id if 0 <= ts.eos_id < n else None
    v.pad_id = ts.pad_id if 0 <= ts.pad_id < n else None
    return v


def _is_spm_bpe(tj: dict) -> bool:
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    blob = json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")], ensure_ascii=False)
    return SPACE in blob


def vocab_from_tokenizer_json(path: Path) -> Vocab:
    tj = read_json(path)
    if not _is_spm_bpe(tj):
        raise ConversionError(
            f"{path}: not a SentencePiece-style BPE tokenizer (needs model.type BPE with byte_fallback and "
            f"'{SPACE}' spaces); provide tokenizer.model")
    model = tj["model"]
    vocab = model.get("vocab") or {}
    if not vocab:
        raise ConversionError(f"{path}: model.vocab is empty")
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for text, tid in vocab.items():
        tokens[tid] = text
    merges = model.get("merges") or []
    rank: Dict[str, int] = {}
    for r, merge in enumerate(merges):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(a + b, r)
    n_merges = len(merges)
    scores, types = [], []
    unk = model.get("unk_token")
    for tid, text in enumerate(tokens):
        if text == unk:
            scores.append(0.0)
            types.append(UNKNOWN)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            scores.append(0.0)
            types.append(BYTE)
        elif text in rank:
            scores.append(-float(rank[text]))
            types.append(NORMAL)
        else:
            # Single characters: never produced by a merge, ranked after all merged pieces.
            scores.append(-float(n_merges + tid))
            types.append(NORMAL)
    v = Vocab(tokens=tokens, scores=scores, types=types, source=str(path))
    v.unk_id = vocab.get(unk) if unk else None
    return v


def vocab_from_gguf(path: Path) -> Vocab:
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ConversionError(f"{path}: cannot read GGUF: {e}") from e

    def get(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    if get("tokenizer.ggml.model") != "llama":
        raise ConversionError(f"{path}: tokenizer.ggml.model is {get('tokenizer.ggml.model')!r}, expected 'llama'")
    tokens = list(get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ConversionError(f"{path}: tokenizer.ggml.tokens is missing")
    scores = [float(s) for s in get("tokenizer.ggml.scores", [0.0] * len(tokens))]
    types = [int(t) for t in get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    return Vocab(tokens=tokens, scores=scores, types=types,
                 bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id"),
                 unk_id=get("tokenizer.ggml.unknown_token_id"), pad_id=get("tokenizer.ggml.padding_token_id"),
                 add_bos=bool(get("tokenizer.ggml.add_bos_token", True)),
                 add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
                 chat_template=get("tokenizer.chat_template"), source=str(path))


# ------------------------------------------------------------------------------------------------
# A HF model directory
# ------------------------------------------------------------------------------------------------


def _token_text(v) -> Optional[str]:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _added_tokens(model_dir: Path, tok_cfg: dict, tok_json: Optional[dict], special_texts: set) -> Dict[int, tuple]:
    """id -> (text, special) from every place HF keeps added tokens."""
    out: Dict[int, tuple] = {}

    def put(tid, text, special):
        tid = int(tid)
        old = out.get(tid)
        if old and old[0] != text:
            raise ConversionError(f"{model_dir}: added token id {tid} is both {old[0]!r} and {text!r}")
        out[tid] = (text, bool(special) or bool(old and old[1]) or text in special_texts)

    added_json = read_json(model_dir / "added_tokens.json", required=False) or {}
    for text, tid in added_json.items():
        put(tid, text, False)
    for tid, data in (tok_cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(data, dict) and "content" in data:
            put(tid, data["content"], data.get("special", False))
    for data in (tok_json or {}).get("added_tokens") or []:
        put(data["id"], data["content"], data.get("special", False))
    return out


def _post_processor_adds(tok_json: Optional[dict], token: Optional[str], at_start: bool) -> Optional[bool]:
    pp = (tok_json or {}).get("post_processor")
    if not isinstance(pp, dict):
        return None
    procs = pp.get("processors", [pp]) if pp.get("type") == "Sequence" else [pp]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            if not single:
                return False
            edge = single[0] if at_start else single[-1]
            return "SpecialToken" in edge and edge["SpecialToken"].get("id") == token
    return None


def read_chat_template(model_dir: Path, tok_cfg: dict) -> Optional[str]:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cj = read_json(model_dir / "chat_template.json", required=False)
    if cj and isinstance(cj.get("chat_template"), str):
        return cj["chat_template"]
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


def load_hf_vocab(model_dir: Path, n_vocab: int, text_config: dict) -> Vocab:
    """The vocabulary of a HF model directory, sized to the embedding's n_vocab rows."""
    model_dir = Path(model_dir)
    tok_cfg = read_json(model_dir / "tokenizer_config.json", required=False) or {}
    tok_json_path = model_dir / "tokenizer.json"
    tok_json = read_json(tok_json_path) if tok_json_path.is_file() else None
    spm_path = model_dir / "tokenizer.model"
    if spm_path.is_file():
        v = vocab_from_spm_model(spm_path)
    elif tok_json is not None:
        v = vocab_from_tokenizer_json(tok_json_path)
    else:
        raise ConversionError(f"{model_dir}: no tokenizer found (tokenizer.model or tokenizer.json)")

    stm = read_json(model_dir / "special_tokens_map.json", required=False) or {}
    named = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(tok_cfg.get(key)) or _token_text(stm.get(key))
        if text is not None:
            named[key] = text
    special_texts = set(named.values())
    for extra in (stm.get("additional_special_tokens") or []):
        if _token_text(extra):
            special_texts.add(_token_text(extra))

    for tid, (text, special) in sorted(_added_tokens(model_dir, tok_cfg, tok_json, special_texts).items()):
        if tid >= n_vocab:
            raise ConversionError(f"{model_dir}: added token {text!r} has id {tid} >= embedding rows {n_vocab}")
        v.set_token(tid, text, special)
    v.fit_to(n_vocab, str(model_dir))

    def resolve(key, config_key, current):
        text = named.get(key)
        if text is not None:
            tid = v.id_of(text)
            if tid is None:
                raise ConversionError(f"{model_dir}: {key} {text!r} is not in the vocabulary")
            return tid
        cid = text_config.get(config_key)
        return cid if isinstance(cid, int) and 0 <= cid < n_vocab else current

    v.bos_id = resolve("bos_token", "bos_token_id", v.bos_id)
    v.eos_id = resolve("eos_token", "eos_token_id", v.eos_id)
    v.unk_id = resolve("unk_token", "unk_token_id", v.unk_id)
    v.pad_id = resolve("pad_token", "pad_token_id", v.pad_id)
    if v.unk_id is not None and v.types[v.unk_id] in (NORMAL, CONTROL):
        v.types[v.unk_id] = UNKNOWN  # tokenizer.json lists <unk> as a special added token

    bos_text = v.tokens[v.bos_id] if v.bos_id is not None else None
    eos_text = v.tokens[v.eos_id] if v.eos_id is not None else None
    add_bos = tok_cfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds(tok_json, bos_text, at_start=True)
    add_eos = tok_cfg.get("add_eos_token")
    if not isinstance(add_eos, bool):
        add_eos = _post_processor_adds(tok_json, eos_text, at_start=False)
    v.add_bos = True if add_bos is None else add_bos   # SentencePiece Llama adds BOS by default
    v.add_eos = False if add_eos is None else add_eos
    v.chat_template = read_chat_template(model_dir, tok_cfg)
    return v
