"""The Python API: Model (weights + one context); Chat (pyvtrim/chat.py) is a conversation on a Model.

    with pyvtrim.Model("llava.gguf") as m:
        print(m.chat("cat.jpg", "What is on the table?"))
        for piece in m.chat("cat.jpg", "Describe it.", stream=True):
            print(piece, end="", flush=True)

A Model holds native memory (weights, KV cache); close() or a `with` block frees it, and any use after
that raises VtrimClosedError. A Model owns one context (one KV cache, one sequence). Calls from several
threads are serialised by a lock (a second caller waits), never run at once; a stream being read in one
thread while another thread starts a new sequence raises VtrimStateError at its next piece, and close()
from another thread stops a generation at its next token (it raises VtrimClosedError there). For
parallel work use one Model per thread. forward(), generate() and chat() each start a fresh sequence;
a Chat keeps its sequence across turns and prefills only each new turn.
"""

from __future__ import annotations

import codecs
import functools
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _ffi
from .errors import (
    VtrimClosedError,
    VtrimContextFullError,
    VtrimStateError,
    VtrimUnsupportedError,
    VtrimValueError,
    check,
    file_not_found,
)
from ._native import (Tokens, _Handles, _max_tokens, _Pending, _Sampler, _sized_call, _struct_to_dict,
                      _token_array, FINISH_CONTEXT_FULL, FINISH_EOS, FINISH_LENGTH)
from .images import ImageLike, as_image_list, native_images
from .reduce import policies_of, stage_dict

if TYPE_CHECKING:
    from .chat import Chat

Images = Union[ImageLike, Sequence[ImageLike], None]

DEVICES = {"auto": 0, "cpu": 1, "gpu": 2}   # enum vtrim_device
KV_TYPES = {"f16": 0, "f32": 1}             # enum vtrim_kv_type

def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a Model method under the Model's lock: one native call sequence at a time, never with close()."""
    @functools.wraps(method)
    def wrapper(self: "Model", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class Model:
    """A vision-language model loaded from GGUF, with one context (KV cache) for running it.

    path: one GGUF with text and vision towers, or llama.cpp's text GGUF with `mmproj` its vision GGUF.
    n_ctx: tokens the KV cache holds (image tokens count; 0: the model's trained context).
    n_threads: CPU threads (None: os.cpu_count()). device: "auto" | "cpu" | "gpu".
    kv_type: "f16" | "f32" (the KV cache's element type).
    vocab_only: load only the tokenizer (no context; tokenize/detokenize only).

    forward(), generate(), chat() and Chat take `reduce=`: None, a visual-token reduction policy
    (pyvtrim.FastV(k=2, ratio=0.5)) or a list of policies applied in order; last_stats["stages"] then
    says what each did.
    """

    def __init__(
        self,
        path: "str | os.PathLike[str]",
        *,
        mmproj: "str | os.PathLike[str] | None" = None,
        n_ctx: int = 4096,
        n_threads: Optional[int] = None,
        device: str = "auto",
        kv_type: str = "f16",
        vocab_only: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.mmproj = None if mmproj is None else os.fspath(mmproj)
        for p in (self.path, self.mmproj):
            if p is not None and not os.path.exists(p):
                raise file_not_found(p)
        if device not in DEVICES:
            raise VtrimValueError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
        if kv_type not in KV_TYPES:
            raise VtrimValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        if int(n_ctx) < 0:
            raise VtrimValueError(f"n_ctx must be >= 0 (0: the model's trained context), got {n_ctx}")
        if n_threads is not None and int(n_threads) < 1:
            raise VtrimValueError(f"n_threads must be >= 1 (None: all cores), got {n_threads}")
        self.n_threads = int(n_threads) if n_threads is not None else (os.cpu_count() or 1)
        self.n_ctx = int(n_ctx)
        self.vocab_only = bool(vocab_only)
        self._seq_id = 0  # bumped by every reset: streams and chats notice that their sequence is gone
        self._lock = threading.RLock()
        self._closing = False
        self._finish_reason: Optional[str] = None

        self._ffi, self._lib = _ffi.get()[:2]
        ffi, lib = self._ffi, self._lib
        self._handles = _Handles(lib)
        self._finalizer = weakref.finalize(self, self._handles.free)
        try:
            mp = ffi.new("struct vtrim_model_params *")
            lib.vtrim_model_params_default(mp)
            fields = dict(ffi.typeof(mp).item.fields)
            mp.device = DEVICES[device]
            if "n_threads" in fields:
                mp.n_threads = self.n_threads
            if self.vocab_only:
                if "vocab_only" not in fields:
                    raise VtrimUnsupportedError("this libvtrim cannot load a vocabulary alone (no vocab_only)")
                mp.vocab_only = True
            out = ffi.new("struct vtrim_model **")
            mmproj_c = ffi.NULL if self.mmproj is None else os.fsencode(self.mmproj)
            check(lib.vtrim_model_load(os.fsencode(self.path), mmproj_c, mp, out), self.path)
            self._handles.model = out[0]

            info = ffi.new("struct vtrim_model_info *")
            check(lib.vtrim_model_get_info(self._handles.model, info))
            self._info = _struct_to_dict(ffi, info)
            if self.n_ctx == 0:
                self.n_ctx = int(self._info.get("n_ctx_train", 0))

            if not self.vocab_only:
                cp = ffi.new("struct vtrim_context_params *")
                lib.vtrim_context_params_default(cp)
                cp.n_ctx = self.n_ctx
                cp.n_threads = self.n_threads
                cp.kv_type = KV_TYPES[kv_type]
                ctx = ffi.new("struct vtrim_context **")
                check(lib.vtrim_context_init(self._handles.model, cp, ctx))
                self._handles.ctx = ctx[0]
        except BaseException:
            self.close()
            raise

    # ---- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the context and the weights. Safe to call twice, and from another thread: a generation
        running there stops at its next token (raising VtrimClosedError) and close() waits for that."""
        self._closing = True
        with self._lock:
            self._finalizer()

    @property
    def closed(self) -> bool:
        return self._handles.model is None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"arch={self._info['arch']!r}"
        return f"<pyvtrim.Model {self.path!r} {state}>"

    def _model(self) -> Any:
        if self._handles.model is None or self._closing:
            raise VtrimClosedError("the Model is closed")
        return self._handles.model

    def _ctx(self) -> Any:
        self._model()
        if self._handles.ctx is None:
            raise VtrimStateError("this Model was loaded with vocab_only=True and has no context")
        return self._handles.ctx

    # ---- what the model is ---------------------------------------------------------------------

    @property
    def info(self) -> Dict[str, Any]:
        """All fields of vtrim_model_info (arch, name, n_vocab, n_embd, image_size, n_image_tokens, ...)."""
        self._model()
        return dict(self._info)

    @property
    def n_vocab(self) -> int:
        return int(self.info["n_vocab"])

    @property
    def image_token_id(self) -> int:
        return int(self.info["image_token_id"])

    @property
    @_locked
    def last_stats(self) -> Dict[str, Any]:
        """What the last prefill and the decodes since did: n_past, n_prompt_tokens, n_images,
        n_image_tokens, n_image_tokens_kept, kv_cache_bytes, t_encode_ms, t_prefill_ms, t_decode_ms,
        n_decoded, prefill_flops(_full), "stages": one dict per reduction stage that ran, and
        "finish_reason": why the last generation ended ("eos", "length", "context_full"; None while it
        runs or when its stream was closed early)."""
        ctx, ffi, lib = self._ctx(), self._ffi, self._lib
        stats = ffi.new("struct vtrim_stats *")
        check(lib.vtrim_get_stats(ctx, stats))
        out = _struct_to_dict(ffi, stats)
        stage = ffi.new("struct vtrim_reduce_stage *")
        out["stages"] = []
        for i in range(int(out.get("n_stages", 0))):
            check(lib.vtrim_get_reduce_stage(ctx, i, stage))
            out["stages"].append(stage_dict(stage))
        out["finish_reason"] = self._finish_reason
        return out

    @property
    @_locked
    def graph_ops(self) -> List[str]:
        """The ggml ops of every graph this Model's context has run, by ggml's enum names (e.g.
        "GGML_OP_MUL_MAT", "GGML_UNARY_OP_SILU"), sorted: what a backend must support to run them."""
        ctx, ffi = self._ctx(), self._ffi
        buf: List[Any] = [None]
        n_out = ffi.new("int32_t *")

        def attempt(capacity: int) -> Tuple[int, int]:
            buf[0] = ffi.new("char[]", capacity)
            rc = self._lib.vtrim_graph_ops(ctx, buf[0], capacity, n_out)
            return rc, int(n_out[0]) + 1

        _sized_call(attempt, 1024)
        text = ffi.string(buf[0]).decode("ascii")
        return text.split(",") if text else []

    @_locked
    def last_kept_image_rows(self) -> List[int]:
        """The image rows the decoder's last layers hold after the last prefill, ascending, as indices
        into that prefill's expanded prompt (each image placeholder counted as n_image_tokens rows)."""
        ctx, ffi = self._ctx(), self._ffi
        buf: List[Any] = [None]
        n_out = ffi.new("int32_t *")

        def attempt(capacity: int) -> Tuple[int, int]:
            buf[0] = ffi.new("int32_t[]", capacity)
            return self._lib.vtrim_get_kept_image_rows(ctx, buf[0], capacity, n_out), int(n_out[0])

        n = _sized_call(attempt, max(1, int(self.last_stats["n_image_tokens"])))
        return list(ffi.unpack(buf[0], n))

    @_locked
    def kv_positions(self, layer: int, head: int) -> List[int]:
        """The positions of the rows decoder layer ``layer`` holds for KV head ``head``, ascending: every
        position of the sequence unless a reduction dropped some (after VLCache each KV head keeps its own)."""
        ctx, ffi = self._ctx(), self._ffi
        buf: List[Any] = [None]
        n_out = ffi.new("int32_t *")

        def attempt(capacity: int) -> Tuple[int, int]:
            buf[0] = ffi.new("int32_t[]", capacity)
            return self._lib.vtrim_get_kv_positions(ctx, int(layer), int(head), buf[0], capacity,
                                                    n_out), int(n_out[0])

        n = _sized_call(attempt, 256)
        return list(ffi.unpack(buf[0], n))

    # ---- text ----------------------------------------------------------------------------------

    @_locked
    def tokenize(self, text: str, add_special: bool = True) -> List[int]:
        """Token ids of text; add_special adds BOS. Special tokens written in the text ("<image>") count."""
        model, ffi = self._model(), self._ffi
        data = text.encode("utf-8")
        buf: List[Any] = [None]
        n_out = ffi.new("int32_t *")

        def attempt(capacity: int) -> Tuple[int, int]:
            buf[0] = ffi.new("int32_t[]", capacity)
            rc = self._lib.vtrim_tokenize(model, data, len(data), bool(add_special), buf[0], capacity, n_out)
            return rc, int(n_out[0])

        n = _sized_call(attempt, len(data) + 8)
        return list(ffi.unpack(buf[0], n))

    def detokenize(self, ids: Tokens, *, remove_leading_space: bool = False) -> str:
        """The text of token ids (BOS/EOS dropped); invalid UTF-8 becomes U+FFFD."""
        return self.detokenize_bytes(ids, remove_leading_space=remove_leading_space).decode("utf-8", "replace")

    @_locked
    def detokenize_bytes(self, ids: Tokens, *, remove_leading_space: bool = False) -> bytes:
        """The raw UTF-8 bytes of token ids (a byte token may hold part of a character)."""
        model, ffi = self._model(), self._ffi
        arr = _token_array(ids)
        if arr.size == 0:
            return b""
        buf: List[Any] = [None]
        n_out = ffi.new("int32_t *")

        def attempt(capacity: int) -> Tuple[int, int]:
            buf[0] = ffi.new("char[]", capacity)
            rc = self._lib.vtrim_detokenize(model, ffi.from_buffer("int32_t[]", arr), int(arr.size),
                                            bool(remove_leading_space), buf[0], capacity, n_out)
            return rc, int(n_out[0])

        n = _sized_call(attempt, 8 * int(arr.size) + 16)
        return ffi.unpack(buf[0], n)

    @_locked
    def is_eog(self, token: int) -> bool:
        """Whether token ends a generation (EOS, EOT, ...)."""
        return bool(self._lib.vtrim_token_is_eog(self._model(), int(token)))

    @_locked
    def chat_prompt(self, question: str, n_images: int = 1) -> str:
        """One user turn in the model's conversation format with n_images image placeholders and the
        assistant's prefix, e.g. "USER: <image>\\nWhat is this? ASSISTANT:" for LLaVA-1.5."""
        model, ffi = self._model(), self._ffi
        q = question.encode("utf-8")
        buf: List[Any] = [None]
        n_out = ffi.new("int32_t *")

        def attempt(capacity: int) -> Tuple[int, int]:
            buf[0] = ffi.new("char[]", capacity)
            rc = self._lib.vtrim_chat_format(model, q, int(n_images), buf[0], capacity, n_out)
            return rc, int(n_out[0])

        n = _sized_call(attempt, len(q) + 256)
        return ffi.unpack(buf[0], n).decode("utf-8", "replace")

    # ---- images --------------------------------------------------------------------------------

    @_locked
    def preprocess(self, image: ImageLike) -> np.ndarray:
        """The pixel values the vision tower sees: float32 [n_tiles, 3, S, S] (S = info["image_size"])."""
        model, ffi = self._model(), self._ffi
        side = int(self._info["image_size"])
        if side <= 0:
            raise VtrimUnsupportedError("this model has no vision tower")
        tile = 3 * side * side
        out: List[np.ndarray] = [np.empty(0, np.float32)]
        n_out = ffi.new("int64_t *")
        with native_images([image]) as handles:
            def attempt(capacity: int) -> Tuple[int, int]:
                out[0] = np.empty(capacity, dtype=np.float32)
                rc = self._lib.vtrim_image_preprocess(model, handles[0], ffi.from_buffer("float[]", out[0]),
                                                      capacity, n_out)
                return rc, int(n_out[0])

            n = _sized_call(attempt, tile)
        return out[0][:n].reshape(n // tile, 3, side, side)

    @_locked
    def preprocess_info(self, image: ImageLike) -> Dict[str, Any]:
        """How the image is tiled: n_tiles, aspect_ratio_id (1-based, Llama-3.2-Vision; 0 for one-tile models)
        and aspect_ratio_mask (1 for each real tile of preprocess()'s output, 0 for padding tiles)."""
        model, ffi = self._model(), self._ffi
        n_tiles, ar_id = ffi.new("int32_t *"), ffi.new("int32_t *")
        with native_images([image]) as handles:
            check(self._lib.vtrim_image_tiles(model, handles[0], n_tiles, ar_id))
        total = max(int(n_tiles[0]), 1)
        if self._info["arch"] == "mllama":
            side = int(self._info["image_size"])
            total = int(self.preprocess(image).shape[0]) if side > 0 else total
        return {"n_tiles": int(n_tiles[0]), "aspect_ratio_id": int(ar_id[0]),
                "aspect_ratio_mask": [1 if i < int(n_tiles[0]) else 0 for i in range(total)]}

    # ---- low level: the sequence step by step ----------------------------------------------------

    @_locked
    def reset(self) -> None:
        """Forgets the sequence (empties the KV cache)."""
        self._reset()

    @_locked
    def prefill(self, tokens: Tokens, images: Images = (), *, reduce: Any = None) -> np.ndarray:
        """Appends tokens (and images, one per image_token_id) to the current sequence; returns the last
        position's logits. forward() is reset() + prefill()."""
        self._ctx()
        self._apply_reduce(reduce)
        self._prefill(tokens, images)
        return self._logits()

    @_locked
    def decode(self, token: int) -> np.ndarray:
        """Appends one token to the sequence and returns its logits."""
        check(self._lib.vtrim_decode(self._ctx(), int(token)))
        return self._logits()

    @_locked
    def logits(self) -> np.ndarray:
        """The float32 logits of the sequence's last position."""
        return self._logits()

    # ---- running -------------------------------------------------------------------------------

    def _apply_reduce(self, reduce: Any) -> None:
        """Makes `reduce` (None, a policy such as pyvtrim.FastV, or a list of them, applied in order) the
        context's visual-token reduction: all or nothing, a bad policy leaves no reduction installed."""
        ctx, ffi, lib = self._ctx(), self._ffi, self._lib
        added = [policy.to_c(ffi, lib) for policy in policies_of(reduce)]  # ValueError before any change
        check(lib.vtrim_reduce_clear(ctx))
        try:
            for add, p in added:
                check(add(ctx, p))
        except BaseException:
            lib.vtrim_reduce_clear(ctx)
            raise

    def _reset(self) -> None:
        check(self._lib.vtrim_context_reset(self._ctx()))
        self._seq_id += 1

    def _prefill(self, tokens: Tokens, images: Images) -> None:
        ctx, ffi = self._ctx(), self._ffi
        arr = _token_array(tokens)
        if arr.size == 0:
            raise VtrimValueError("no tokens to prefill")
        image_list = as_image_list(images)
        n_placeholders = int(np.count_nonzero(arr == self.image_token_id))
        if n_placeholders != len(image_list):
            raise VtrimValueError(
                f"the tokens hold {n_placeholders} image placeholder(s) (id {self.image_token_id}) "
                f"but {len(image_list)} image(s) were given")
        with native_images(image_list) as handles:
            check(self._lib.vtrim_prefill(ctx, ffi.from_buffer("int32_t[]", arr), int(arr.size),
                                          handles, len(image_list)))

    def _logits(self) -> np.ndarray:
        logits = np.empty(self.n_vocab, dtype=np.float32)
        check(self._lib.vtrim_logits(self._ctx(), self._ffi.from_buffer("float[]", logits), logits.size))
        return logits

    def _check_seq(self, seq_id: int) -> None:
        self._ctx()  # a Model closed while a stream was being read
        if self._seq_id != seq_id:
            raise VtrimStateError("the Model started another sequence while this one was being generated")

    def _sample_tokens(self, sampler: _Sampler, max_tokens: int, pending: _Pending) -> Iterator[int]:
        """Samples after a prefill: yields tokens until an EOG (not yielded) or max_tokens. Every yielded
        token but the last is decoded into the sequence; `pending` records what is not (yet) in it.
        A full context ends the generation early."""
        # The sequence is the one of now, not of the first next(): a stream read later notices a reset.
        return self._sample_loop(sampler, max_tokens, pending, self._seq_id)

    def _sample_loop(self, sampler: _Sampler, max_tokens: int, pending: _Pending, seq_id: int) -> Iterator[int]:
        # The lock is held for each step, not across a yield: the reader of a stream may be another thread,
        # and close() must be able to come in between two tokens.
        lib = self._lib
        pending.tokens = []
        self._finish_reason = None
        if max_tokens == 0:
            self._finish_reason = FINISH_LENGTH
            return
        try:
            for i in range(max_tokens):
                with self._lock:
                    self._check_seq(seq_id)
                    token = sampler.sample(self._ctx())
                    pending.tokens = [token]
                    if lib.vtrim_token_is_eog(self._model(), token):
                        self._finish_reason = FINISH_EOS
                        return
                    if i + 1 == max_tokens:
                        self._finish_reason = FINISH_LENGTH
                yield token
                if i + 1 == max_tokens:
                    return
                with self._lock:
                    self._check_seq(seq_id)
                    try:
                        check(lib.vtrim_decode(self._ctx(), token))
                    except VtrimContextFullError:
                        self._finish_reason = FINISH_CONTEXT_FULL
                        return
                    pending.tokens = []
                    pending.decoded.append(token)
        except GeneratorExit:  # closed at a yield: the sequence is as recorded
            raise
        except BaseException:  # e.g. KeyboardInterrupt between a decode and its record
            pending.broken = True
            raise

    def _text_pieces(self, tokens: Iterator[int], on_done: Optional[Callable[[str], None]] = None
                     ) -> Iterator[str]:
        """Text of a reply as it is generated: only complete UTF-8 characters, the first piece without
        SentencePiece's leading space. The pieces join to exactly the detokenized reply."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        ids: List[int] = []
        fed = 0
        text: List[str] = []
        try:
            for token in tokens:
                ids.append(token)
                data = self.detokenize_bytes(ids, remove_leading_space=True)
                piece = decoder.decode(data[fed:])
                fed = len(data)
                if piece:
                    text.append(piece)
                    yield piece
            piece = decoder.decode(b"", final=True)
            if piece:
                text.append(piece)
                yield piece
        finally:
            if on_done is not None:
                on_done("".join(text))

    @_locked
    def forward(self, tokens: Tokens, images: Images = (), *, reduce: Any = None) -> np.ndarray:
        """Runs a fresh sequence over tokens (each image_token_id takes the next image) and returns the
        float32 logits of the last position, shape [n_vocab]."""
        self._ctx()
        self._apply_reduce(reduce)
        self._reset()
        self._prefill(tokens, images)
        return self._logits()

    @_locked
    def generate(
        self,
        tokens: Tokens,
        images: Images = (),
        *,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int = 0,
        reduce: Any = None,
    ) -> List[int]:
        """A fresh sequence: prefill tokens (and images), then sample until an end-of-generation token
        (not included) or max_tokens. temperature 0 is greedy."""
        self._ctx()
        n = _max_tokens(max_tokens)
        sampler = _Sampler(temperature, top_k, top_p, seed)
        try:
            self._apply_reduce(reduce)
            self._reset()
            self._prefill(tokens, images)
            return list(self._sample_tokens(sampler, n, _Pending()))
        finally:
            sampler.close()

    @_locked
    def chat(
        self,
        image: Optional[ImageLike],
        question: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int = 0,
        stream: bool = False,
        reduce: Any = None,
    ) -> Union[str, Iterator[str]]:
        """Answers one question about one image (None: a text-only question) in a fresh sequence.
        stream=True returns an iterator of text pieces; the image is encoded and the prompt prefilled
        before this returns, so input errors raise here, not in the iterator."""
        self._ctx()
        n = _max_tokens(max_tokens)
        sampler = _Sampler(temperature, top_k, top_p, seed)
        images = as_image_list(image)
        self._apply_reduce(reduce)
        tokens = self.tokenize(self.chat_prompt(question, len(images)), add_special=True)
        self._reset()
        self._prefill(tokens, images)
        pieces = self._text_pieces(self._sample_tokens(sampler, n, _Pending()),
                                   on_done=lambda _: sampler.close())
        return pieces if stream else "".join(pieces)

    def start_chat(self, **sampling: Any) -> "Chat":
        """A multi-turn conversation on this Model; see Chat."""
        from .chat import Chat  # noqa: F811  (chat.py builds on Model: imported here, not at module level)

        return Chat(self, **sampling)
