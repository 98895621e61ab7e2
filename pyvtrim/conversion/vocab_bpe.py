"""Byte-level BPE (GPT-2 / Llama-3 style) vocabularies for GGUF, as llama.cpp's "gpt2" tokenizer reads them.

The source is a HF tokenizer.json whose model is a byte-level BPE (model.type "BPE", no byte_fallback,
a ByteLevel pre-tokenizer). GGUF stores the pieces, their types and the merges ("a b", in rank order);
the pre-tokenizer regex is not stored but named (tokenizer.ggml.pre), so only the splits llama.cpp knows
by name can be converted: we recognise Llama-3's ("llama-bpe").

Added tokens (tokenizer.json's added_tokens, tokenizer_config.json's added_tokens_decoder,
added_tokens.json) are placed at their ids: special ones as CONTROL, others as USER_DEFINED. Embedding
rows beyond the tokenizer are filled with "[PAD{id}]" UNUSED tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .base import ConversionError, read_json
from .vocab import (CONTROL, NORMAL, UNUSED, USER_DEFINED, _added_tokens, _post_processor_adds, _token_text,
                    read_chat_template)

# Llama-3's split regex as tokenizer.json spells it (llama.cpp's pre-tokenizer "llama-bpe").
LLAMA3_SPLIT_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
KNOWN_SPLITS = {LLAMA3_SPLIT_REGEX: "llama-bpe"}


def llama31_special_token(tid: int) -> str:
    """The name Llama-3.1/3.2 gives special token id 128000..128255 (the pinned archive's Llama-3 vocabulary
    has Llama-3.0's names): what a Llama-3.2-Vision tokenizer holds at those ids."""
    fixed = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128002: "<|reserved_special_token_0|>",
             128003: "<|reserved_special_token_1|>", 128004: "<|finetune_right_pad_id|>",
             128005: "<|reserved_special_token_2|>", 128006: "<|start_header_id|>", 128007: "<|end_header_id|>",
             128008: "<|eom_id|>", 128009: "<|eot_id|>", 128010: "<|python_tag|>"}
    if tid in fixed:
        return fixed[tid]
    if 128011 <= tid <= 128255:
        return f"<|reserved_special_token_{tid - 128011 + 3}|>"
    raise ValueError(f"{tid} is not a Llama-3 special token id")


@dataclass
class BpeVocab:
    tokens: List[str]
    types: List[int]
    merges: List[str]
    pre: str = "llama-bpe"
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None
    eot_id: Optional[int] = None
    eom_id: Optional[int] = None
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
        self.tokens[tid] = text
        self.types[tid] = CONTROL if special else USER_DEFINED
        self._index = {}

    def pad_to(self, n: int) -> None:
        for tid in range(len(self.tokens), n):
            self.tokens.append(f"[PAD{tid}]")
            self.types.append(UNUSED)
        self._index = {}

    def fit_to(self, n_vocab: int, where: str) -> None:
        if len(self.tokens) > n_vocab:
            raise ConversionError(
                f"{where}: the tokenizer has {len(self.tokens)} tokens but the embedding only {n_vocab} rows")
        self.pad_to(n_vocab)

    def add_to_gguf(self, w) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types([int(t) for t in self.types])
        w.add_token_merges(self.merges)
        for key, tid in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id),
                         ("eot", self.eot_id), ("eom", self.eom_id)):
            if tid is None:
                continue
            if not 0 <= tid < len(self.tokens):
                raise ConversionError(f"{key} token id {tid} is outside the vocabulary ({len(self.tokens)} tokens)")
            getattr(w, f"add_{key}_token_id")(int(tid))
        w.add_add_bos_token(bool(self.add_bos))
        w.add_add_eos_token(bool(self.add_eos))
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _split_regex(pre_tokenizer) -> Optional[str]:
    """The regex of the (single) Split step of a pre-tokenizer, or None."""
    if not isinstance(pre_tokenizer, dict):
        return None
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer.get("type") == "Sequence" \
        else [pre_tokenizer]
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if isinstance(s, dict) and s.get("type") == "Split"]
    return regexes[0] if len(regexes) == 1 else None


def _is_byte_level(tj: dict) -> bool:
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return False
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(isinstance(s, dict) and s.get("type") == "ByteLevel" for s in steps)


def bpe_vocab_from_tokenizer_json(path: Path) -> BpeVocab:
    tj = read_json(path)
    if not _is_byte_level(tj):
        raise ConversionError(f"{path}: not a byte-level BPE tokenizer (needs model.type BPE without byte_fallback "
                              "and a ByteLevel pre-tokenizer)")
    if tj.get("normalizer") not in (None, {}):
        raise ConversionError(f"{path}: a byte-level BPE tokenizer with a normalizer is not supported")
    regex = _split_regex(tj.get("pre_tokenizer"))
    pre = KNOWN_SPLITS.get(regex)
    if pre is None:
        raise ConversionError(f"{path}: unsupported pre-tokenizer split {regex!r} (supported: Llama-3's, "
                              "llama.cpp's 'llama-bpe')")
    model = tj["model"]
    vocab = model.get("vocab") or {}
    if not vocab:
        raise ConversionError(f"{path}: model.vocab is empty")
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for text, tid in vocab.items():
        if not isinstance(tid, int) or tid < 0:
            raise ConversionError(f"{path}: token {text!r} has a bad id {tid!r}")
        tokens[tid] = text
        types[tid] = NORMAL
    merges = []
    for i, m in enumerate(model.get("merges") or []):
        if isinstance(m, str):
            parts = m.split(" ")
        elif isinstance(m, (list, tuple)):
            parts = list(m)
        else:
            parts = []
        if len(parts) != 2 or not all(isinstance(p, str) and p and " " not in p for p in parts):
            raise ConversionError(f"{path}: merge {i} ({m!r}) is not a pair of space-free pieces")
        merges.append(f"{parts[0]} {parts[1]}")
    if not merges:
        raise ConversionError(f"{path}: model.merges is empty")
    return BpeVocab(tokens=tokens, types=types, merges=merges, pre=pre, source=str(path))


def load_hf_bpe_vocab(model_dir: Path, n_vocab: int, text_config: dict) -> BpeVocab:
    """The byte-level BPE vocabulary of a HF model directory, sized to the embedding's n_vocab rows."""
    model_dir = Path(model_dir)
    tok_json_path = model_dir / "tokenizer.json"
    if not tok_json_path.is_file():
        raise ConversionError(f"{model_dir}: no tokenizer found (tokenizer.json)")
    tok_json = read_json(tok_json_path)
    tok_cfg = read_json(model_dir / "tokenizer_config.json", required=False) or {}
    v = bpe_vocab_from_tokenizer_json(tok_json_path)

    stm = read_json(model_dir / "special_tokens_map.json", required=False) or {}
    named = {}
    for key in ("bos_token", "eos_token", "pad_token"):
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

    def resolve(key, config_key):
        text = named.get(key)
        if text is not None:
            tid = v.id_of(text)
            if tid is None:
                raise ConversionError(f"{model_dir}: {key} {text!r} is not in the vocabulary")
            return tid
        cid = text_config.get(config_key)
        if isinstance(cid, list):  # eos_token_id may list several ids; the first is the tokenizer's own
            cid = cid[0] if cid else None
        return cid if isinstance(cid, int) and 0 <= cid < n_vocab else None

    v.bos_id = resolve("bos_token", "bos_token_id")
    v.eos_id = resolve("eos_token", "eos_token_id")
    v.pad_id = resolve("pad_token", "pad_token_id")
    v.eot_id = v.id_of("<|eot_id|>")
    v.eom_id = v.id_of("<|eom_id|>")

    bos_text = v.tokens[v.bos_id] if v.bos_id is not None else None
    add_bos = tok_cfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _post_processor_adds(tok_json, bos_text, at_start=True)
    add_eos = tok_cfg.get("add_eos_token")
    v.add_bos = True if add_bos is None else add_bos   # Llama-3 adds <|begin_of_text|> by default
    v.add_eos = bool(add_eos) if isinstance(add_eos, bool) else False
    v.chat_template = read_chat_template(model_dir, tok_cfg)
    return v
