"""The Python API: Model (weights + a default Session); Session (pyvtrim/session.py) is one context on it;
Chat (pyvtrim/chat.py) is a conversation on a Session.

    with pyvtrim.Model("llava.gguf") as m:
        print(m.chat("cat.jpg", "What is on the table?"))
        for piece in m.chat("cat.jpg", "Describe it.", stream=True):
            print(piece, end="", flush=True)

A Model holds native memory (weights, KV cache); close() or a `with` block frees it, and any use after
that raises VtrimClosedError. Model.forward/generate/chat/... run on the Model's default session (one KV
cache, one sequence); model.session() makes more, which share the weights and run at the same time from
their own threads. Calls on one session from several threads are serialised by its lock (a second caller
waits), never run at once; a stream being read in one thread while another thread starts a new sequence
raises VtrimStateError at its next piece, and close() from another thread stops a generation at its next
token (it raises VtrimClosedError there). forward(), generate() and chat() each start a fresh sequence;
a Chat keeps its sequence across turns and prefills only each new turn.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _ffi
from .errors import (
    VtrimClosedError,
    VtrimStateError,
    VtrimUnsupportedError,
    VtrimValueError,
    check,
    file_not_found,
)
from ._native import Tokens, _Handles, _sized_call, _struct_to_dict, _token_array
from .images import ImageLike, native_images

if TYPE_CHECKING:
    from .chat import Chat
    from .session import Session

Images = Union[ImageLike, Sequence[ImageLike], None]

DEVICES = {"auto": 0, "cpu": 1, "gpu": 2}   # enum vtrim_device
KV_TYPES = {"f16": 0, "f32": 1}             # enum vtrim_kv_type
VISION_ATTN = {"auto": 0, "flash": 1, "chunked": 2}   # enum vtrim_vision_attn

def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a Model method under the Model's lock: one native call sequence at a time, never with close()."""
    @functools.wraps(method)
    def wrapper(self: "Model", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class Model:
    """A vision-language model loaded from GGUF, with a default Session (KV cache) for running it;
    session() makes more on the same weights.

    path: one GGUF with text and vision towers, or llama.cpp's text GGUF with `mmproj` its vision GGUF.
    n_ctx: tokens the KV cache holds (image tokens count; 0: the model's trained context).
    n_threads: CPU threads (None: os.cpu_count()). device: "auto" | "cpu" | "gpu".
    kv_type: "f16" | "f32" (the KV cache's element type).
    n_batch: prompt rows per prefill graph (a longer prompt runs in chunks; 0: the library's default, 512).
    use_mmap: map the weight file (on the CPU the weights are its pages, shared by every process that maps
        it); False: read it into the heap.
    image_cache_mib: the image-embedding cache the sessions share (an image any of them saw is not encoded
        again; LLaVA without FiCoCo-V); 0: none.
    rpc: ggml rpc-server endpoints ("host:port", or a list): the decoder layers are split in equal shares
        over them and this machine, which keeps the last share (`pyvtrim rpc-server` starts one).
    vocab_only: load only the tokenizer (no context; tokenize/detokenize only).
    vision_attn: how the vision towers compute attention: "auto" (on the CPU, explicit scores by chunks of
        query rows for sequences of >= 1024 positions, where ggml's CPU flash kernel is slow; else flash
        attention), "flash" or "chunked".

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
        n_batch: int = 0,
        rpc: "str | Sequence[str] | None" = None,
        use_mmap: bool = True,
        image_cache_mib: float = 256,
        vision_attn: str = "auto",
    ) -> None:
        self.path = os.fspath(path)
        self.mmproj = None if mmproj is None else os.fspath(mmproj)
        for p in (self.path, self.mmproj):
            if p is not None and not os.path.exists(p):
                raise file_not_found(p)
        if device not in DEVICES:
            raise VtrimValueError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
        if vision_attn not in VISION_ATTN:
            raise VtrimValueError(f"vision_attn must be one of {sorted(VISION_ATTN)}, got {vision_attn!r}")
        if kv_type not in KV_TYPES:
            raise VtrimValueError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        if int(n_ctx) < 0:
            raise VtrimValueError(f"n_ctx must be >= 0 (0: the model's trained context), got {n_ctx}")
        if n_threads is not None and int(n_threads) < 1:
            raise VtrimValueError(f"n_threads must be >= 1 (None: all cores), got {n_threads}")
        self.n_threads = int(n_threads) if n_threads is not None else (os.cpu_count() or 1)
        self.n_ctx = int(n_ctx)
        if int(n_batch) < 0:
            raise VtrimValueError(f"n_batch must be >= 1 (0: the library's default), got {n_batch}")
        self.n_batch = int(n_batch)
        servers = [rpc] if isinstance(rpc, str) else list(rpc or [])
        if not all(isinstance(e, str) and e.strip() and "," not in e for e in servers):
            raise VtrimValueError(f"rpc must be 'host:port' or a list of them, got {rpc!r}")
        self.rpc = [e.strip() for e in servers]
        self.kv_type = kv_type
        self.vocab_only = bool(vocab_only)
        self._lock = threading.RLock()   # the model's own calls (tokenizer, images); sessions have theirs
        self._closing = False
        self._default = None
        self._sessions: "weakref.WeakSet[Session]" = weakref.WeakSet()

        self._ffi, self._lib = _ffi.get()[:2]
        ffi, lib = self._ffi, self._lib
        self._handles = _Handles(lib)
        self._finalizer = weakref.finalize(self, self._handles.free)
        try:
            mp = ffi.new("struct vtrim_model_params *")
            lib.vtrim_model_params_default(mp)
            fields = dict(ffi.typeof(mp).item.fields)
            mp.device = DEVICES[device]
            rpc_c = ffi.new("char[]", ",".join(self.rpc).encode()) if self.rpc else ffi.NULL
            if self.rpc:
                if "rpc_servers" not in fields:
                    raise VtrimUnsupportedError("this libvtrim predates RPC servers (no rpc_servers)")
                mp.rpc_servers = rpc_c   # rpc_c outlives the load call below
            if "use_mmap" in fields:
                mp.use_mmap = bool(use_mmap)
            if float(image_cache_mib) < 0:
                raise VtrimValueError(f"image_cache_mib must be >= 0 (0: no cache), got {image_cache_mib}")
            if "image_cache_bytes" in fields:
                mp.image_cache_bytes = int(float(image_cache_mib) * (1 << 20))
            if "n_threads" in fields:
                mp.n_threads = self.n_threads
            if vision_attn != "auto":
                if "vision_attn" not in fields:
                    raise VtrimUnsupportedError("this libvtrim has one vision attention (no vision_attn)")
                mp.vision_attn = VISION_ATTN[vision_attn]
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
                from .session import Session  # session.py builds on Model: imported here, not at module level

                self._default: Optional[Session] = Session(self, n_ctx=self.n_ctx, kv_type=kv_type)
        except BaseException:
            self.close()
            raise

    # ---- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees every session's context and the weights. Safe to call twice, and from another thread: a
        generation running in a session stops at its next token (raising VtrimClosedError) and close()
        waits for that."""
        self._closing = True
        for session in list(self._sessions):
            session.close()
        with self._lock:
            self._finalizer()

    def session(self, *, n_ctx: Optional[int] = None, kv_type: Optional[str] = None,
                n_threads: Optional[int] = None, n_batch: Optional[int] = None) -> "Session":
        """A new sequence (its own KV cache and lock) on these weights; None: the Model's n_ctx, kv_type,
        n_threads, n_batch."""
        from .session import Session

        if self.vocab_only:
            raise VtrimStateError("this Model was loaded with vocab_only=True and has no context")
        return Session(self, n_ctx=n_ctx, kv_type=kv_type, n_threads=n_threads, n_batch=n_batch)

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

    def _session(self) -> "Session":
        """The default session, on which forward/generate/chat/... run."""
        self._model()
        if self._default is None:
            raise VtrimStateError("this Model was loaded with vocab_only=True and has no context")
        return self._default

    def _ctx(self) -> Any:
        return self._session()._ctx()

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

    # ---- the default session -----------------------------------------------------------------------
    # A Model is usable as one sequence: these run on its default session (see Session for each).

    @property
    def last_stats(self) -> Dict[str, Any]:
        return self._session().last_stats

    @property
    def graph_ops(self) -> List[str]:
        return self._session().graph_ops

    def last_kept_image_rows(self) -> List[int]:
        return self._session().last_kept_image_rows()

    def kv_positions(self, layer: int, head: int) -> List[int]:
        return self._session().kv_positions(layer, head)

    def memory(self) -> Dict[str, int]:
        return self._session().memory()

    def reset(self) -> None:
        self._session().reset()

    def prefill(self, tokens: Tokens, images: Images = (), *, reduce: Any = None) -> np.ndarray:
        return self._session().prefill(tokens, images, reduce=reduce)

    def decode(self, token: int) -> np.ndarray:
        return self._session().decode(token)

    def logits(self) -> np.ndarray:
        return self._session().logits()

    def forward(self, tokens: Tokens, images: Images = (), *, reduce: Any = None) -> np.ndarray:
        return self._session().forward(tokens, images, reduce=reduce)

    def generate(self, tokens: Tokens, images: Images = (), **kwargs: Any) -> List[int]:
        return self._session().generate(tokens, images, **kwargs)

    def chat(self, image: Optional[ImageLike] = None, question: Optional[str] = None, *,
             messages: Optional[List[Dict[str, Any]]] = None, **kwargs: Any) -> Any:
        """Model.chat(image, question, ...) (see Session.chat), or Model.chat(messages=[...], ...): an
        OpenAI-style conversation, as create_chat_completion, returning the reply's text (or a stream of
        text pieces with stream=True)."""
        if messages is not None:
            if question is not None or image is not None:
                raise VtrimValueError("give either messages= or an image and a question, not both")
            return self._session().chat_messages(messages, **kwargs)
        if question is None:
            raise VtrimValueError("chat() needs a question (or messages=)")
        return self._session().chat(image, question, **kwargs)

    def create_chat_completion(self, messages: List[Dict[str, Any]], **kwargs: Any) -> Any:
        return self._session().create_chat_completion(messages, **kwargs)

    def start_chat(self, **sampling: Any) -> "Chat":
        return self._session().start_chat(**sampling)

    # used by Chat and the tests on a Model
    @property
    def _seq_id(self) -> int:
        return self._session()._seq_id

    def _reset(self) -> None:
        self._session()._reset()

    def _text_pieces(self, tokens: Any, on_done: Any = None) -> Any:
        return self._session()._text_pieces(tokens, on_done)
