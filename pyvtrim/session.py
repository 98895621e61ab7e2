"""Session: one context (KV cache, sequence) on a Model; several sessions share the Model's weights.

    with pyvtrim.Model("llava.gguf") as m:
        a, b = m.session(n_ctx=2048), m.session(n_ctx=2048)   # each usable from its own thread
        threading.Thread(target=a.chat, args=("cat.jpg", "What is it?")).start()
        print(b.create_chat_completion([{"role": "user", "content": "Hello"}])["choices"][0])

Each Session has its own lock: calls on one session are serialised (a second caller waits), calls on two
sessions run at once (libvtrim releases the GIL). Model.chat/generate/forward/... run on the Model's default
session. Model.close() closes every session first; a generation running in one stops at its next token
(VtrimClosedError there). cancel() stops what a session runs now (another thread may call it): a prefill or
decode in progress ends at its next graph node (VtrimAbortedError, the sequence as before that call), a
generation ends with finish_reason "cancelled"; the session stays usable.
"""

from __future__ import annotations

import codecs
import functools
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import (
    VtrimAbortedError,
    VtrimClosedError,
    VtrimContextFullError,
    VtrimStateError,
    VtrimValueError,
    check,
)
from ._native import (Tokens, _max_tokens, _Pending, _Sampler, _sized_call, _struct_to_dict, _token_array,
                      FINISH_CANCELLED, FINISH_CONTEXT_FULL, FINISH_EOS, FINISH_LENGTH)
from .images import ImageLike, as_image_list, native_images
from .reduce import policies_of, stage_dict

if TYPE_CHECKING:
    from .chat import Chat
    from .model import Model

Images = Union[ImageLike, Sequence[ImageLike], None]

KV_TYPES = {"f16": 0, "f32": 1}             # enum vtrim_kv_type


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a Session method under the Session's lock: one native call sequence at a time, never with close()."""
    @functools.wraps(method)
    def wrapper(self: "Session", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class _Ctx:
    """A native context pointer, freed once (by Session.close(), the Model's close() or the collector)."""

    __slots__ = ("lib", "ptr")

    def __init__(self, lib: Any, ptr: Any) -> None:
        self.lib, self.ptr = lib, ptr

    def free(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            self.lib.vtrim_context_free(ptr)


class Session:
    """A sequence (KV cache) on a Model: made by Model.session(n_ctx=..., kv_type=...)."""

    def __init__(self, model: "Model", *, n_ctx: Optional[int] = None, kv_type: Optional[str] = None,
                 n_threads: Optional[int] = None, n_batch: Optional[int] = None) -> None:
        kv_type = model.kv_type if kv_type is None else kv_type
        if kv_type not in KV_TYPES:
            raise VtrimValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        n_ctx = model.n_ctx if n_ctx is None else int(n_ctx)
        if n_ctx < 0:
            raise VtrimValueError(f"n_ctx must be >= 0 (0: the model's trained context), got {n_ctx}")
        if n_threads is not None and int(n_threads) < 1:
            raise VtrimValueError(f"n_threads must be >= 1 (None: the Model's), got {n_threads}")
        n_batch = model.n_batch if n_batch is None else int(n_batch)
        if n_batch < 0:
            raise VtrimValueError(f"n_batch must be >= 1 (0: the library's default), got {n_batch}")
        self.model = model
        self._ffi, self._lib = model._ffi, model._lib
        ffi, lib = self._ffi, self._lib
        self.n_ctx = n_ctx if n_ctx > 0 else int(model._info.get("n_ctx_train", 0))
        self.n_threads = model.n_threads if n_threads is None else int(n_threads)
        self.kv_type = kv_type
        self._seq_id = 0  # bumped by every reset: streams and chats notice that their sequence is gone
        self._lock = threading.RLock()
        self._closing = False
        self._cancelled = False
        self._finish_reason: Optional[str] = None
        self._held: Any = None   # what the KV cache holds, for prefix reuse (completion.Held)
        cp = ffi.new("struct vtrim_context_params *")
        lib.vtrim_context_params_default(cp)
        cp.n_ctx = self.n_ctx
        cp.n_threads = self.n_threads
        if n_batch > 0:
            cp.n_batch = n_batch
        self.n_batch = int(cp.n_batch)
        cp.kv_type = KV_TYPES[kv_type]
        out = ffi.new("struct vtrim_context **")
        check(lib.vtrim_context_init(model._model(), cp, out))
        self._handle = _Ctx(lib, out[0])
        model._handles.contexts.append(self._handle)
        model._sessions.add(self)
        self._finalizer = weakref.finalize(self, self._handle.free)

    # ---- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the context. Safe to call twice, and from another thread: a generation running here stops
        at its next token (raising VtrimClosedError) and close() waits for that."""
        self._closing = True
        self._abort(True)
        with self._lock:
            self._finalizer()
            try:
                self.model._handles.contexts.remove(self._handle)
            except ValueError:
                pass

    @property
    def closed(self) -> bool:
        return self._handle.ptr is None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<pyvtrim.Session n_ctx={self.n_ctx} {'closed' if self.closed else 'open'}>"

    def _ctx(self) -> Any:
        self.model._model()
        if self._closing or self._handle.ptr is None:
            raise VtrimClosedError("the Session is closed")
        return self._handle.ptr

    # ---- cancellation --------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stops what this session runs now (from any thread): a prefill or decode at its next graph node,
        a generation at its next token. The session stays usable; the next call starts afresh."""
        self._cancelled = True
        self._abort(True)

    def _abort(self, flag: bool) -> None:
        ptr = self._handle.ptr
        if ptr is not None:
            self._lib.vtrim_context_abort(ptr, bool(flag))

    def _begin(self) -> None:
        """A new call: a cancel() made before it does not apply to it."""
        self._cancelled = False
        self._abort(False)

    # ---- the model's text side, for Chat and completions -----------------------------------------

    @property
    def info(self) -> Dict[str, Any]:
        return self.model.info

    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab

    @property
    def image_token_id(self) -> int:
        return self.model.image_token_id

    def tokenize(self, text: str, add_special: bool = True) -> List[int]:
        return self.model.tokenize(text, add_special)

    def detokenize_bytes(self, ids: Tokens, *, remove_leading_space: bool = False) -> bytes:
        return self.model.detokenize_bytes(ids, remove_leading_space=remove_leading_space)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def chat_prompt(self, question: str, n_images: int = 1) -> str:
        return self.model.chat_prompt(question, n_images)

    # ---- what the context did ------------------------------------------------------------------

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
    def memory(self) -> Dict[str, int]:
        """Bytes held, by kind (vtrim_get_memory): weights_text/vision/projector (of those weights_rpc on RPC
        servers, weights_mapped the file's pages), kv_cache (as allocated for n_ctx), cross_cache, compute
        (the compute buffers as sized by the largest graphs run so far), image_embeddings, host_logits."""
        mem = self._ffi.new("struct vtrim_memory *")
        check(self._lib.vtrim_get_memory(self._ctx(), mem))
        return {k: int(v) for k, v in _struct_to_dict(self._ffi, mem).items()}

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


    # ---- low level: the sequence step by step ----------------------------------------------------

    @_locked
    def reset(self) -> None:
        """Forgets the sequence (empties the KV cache)."""
        self._begin()
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
        self._begin()
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

    def _truncate(self, n_keep: int) -> None:
        check(self._lib.vtrim_context_truncate(self._ctx(), int(n_keep)))
        self._seq_id += 1

    def _reset(self) -> None:
        check(self._lib.vtrim_context_reset(self._ctx()))
        self._seq_id += 1
        self._held = None

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
                    if self._cancelled:
                        self._finish_reason = FINISH_CANCELLED
                        return
                    token = sampler.sample(self._ctx())
                    pending.tokens = [token]
                    if lib.vtrim_token_is_eog(self.model._model(), token):
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
                    except VtrimAbortedError:  # cancel(): the token is not in the cache, as if never decoded
                        self._finish_reason = FINISH_CANCELLED
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
        self._begin()
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
        self._begin()
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
        self._begin()
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
        """A multi-turn conversation on this session; see Chat."""
        from .chat import Chat  # noqa: F811  (chat.py builds on Session: imported here, not at module level)

        return Chat(self, **sampling)

    # ---- OpenAI-style messages -------------------------------------------------------------------

    def create_chat_completion(self, messages: List[Dict[str, Any]], **kwargs: Any) -> Any:
        """An OpenAI-style chat completion: messages with system/user/assistant roles and image parts
        (pyvtrim/messages.py), max_tokens (None: until the end or the full context), temperature (0:
        greedy), top_p, top_k (0: off), seed (None: random), stop (a string or up to 4), reduce (policies
        or dicts {"method": "fastv", "k": 2, "ratio": 0.5}). Returns a chat.completion dict, or with
        stream=True an iterator of chat.completion.chunk dicts (the last carries finish_reason and usage).
        usage has prompt_tokens (positions, images expanded), completion_tokens, prompt_tokens_details.
        cached_tokens (reused from the session's cache) and "pyvtrim": timings and reduction stages.
        Input errors raise before anything is returned (VtrimValueError and its kin)."""
        from .completion import create_chat_completion

        return create_chat_completion(self, messages, **kwargs)

    def chat_messages(self, messages: List[Dict[str, Any]], *, stream: bool = False, **kwargs: Any
                      ) -> Union[str, Iterator[str]]:
        """The reply's text to OpenAI-style messages (see create_chat_completion); stream=True: its pieces."""
        result = self.create_chat_completion(messages, stream=stream, **kwargs)
        if not stream:
            return str(result["choices"][0]["message"]["content"])
        return (c["choices"][0]["delta"]["content"] for c in result if c["choices"][0]["delta"].get("content"))
