"""Chat: a multi-turn conversation on a Session (or a Model's default one), keeping its sequence across turns."""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

from ._native import _max_tokens, _Pending, _Sampler
from .errors import VtrimContextFullError
from .images import ImageLike, as_image_list
from .model import Model
from .session import Session

class _Turn:
    """One user turn of a Chat and its reply, enough to rebuild the conversation without older turns."""

    __slots__ = ("text", "images", "reply", "sep")

    def __init__(self, text: str, images: List[ImageLike]) -> None:
        self.text = text                # the formatted user turn (vtrim_chat_format)
        self.images = images
        self.reply: List[int] = []      # the reply tokens in the KV cache
        self.sep: List[int] = []        # what closes the reply before the next turn (its EOG, or EOS)


class Chat:
    """A conversation that keeps its sequence in the Model's context across turns.

    Each ask() formats one user turn with vtrim_chat_format (the C side owns the template) and prefills
    only the new tokens: the first turn starts with BOS; a later turn starts with the token that ended
    the previous reply (the EOG the model sampled, or EOS when the reply hit max_tokens), as the
    conversation format separates turns ("... ASSISTANT: answer</s>USER: ..." for LLaVA-1.5).
    If something else used the Model in between (forward, generate, chat), the next turn rebuilds the
    whole conversation in one prefill.

    When a new turn does not fit in the free part of n_ctx, the oldest turns (with their images) are
    dropped from the context until it fits, and the conversation is prefilled again from the first
    turn kept; `turns_dropped` counts them (`history` keeps every turn). A turn that does not fit even
    alone raises VtrimContextFullError and the Chat stays usable. A reply cut by the full context has
    last_stats["finish_reason"] == "context_full".
    """

    def __init__(self, model: "Model | Session", *, max_tokens: int = 256, temperature: float = 0.0, top_k: int = 40,
                 top_p: float = 0.95, seed: int = 0, reduce: Any = None) -> None:
        self.model = model
        self._s: Session = model._session() if isinstance(model, Model) else model
        self.max_tokens = _max_tokens(max_tokens)
        self.history: List[Tuple[str, str]] = []
        self.turns_dropped = 0
        self._reduce = reduce
        self._sampler = _Sampler(temperature, top_k, top_p, seed)
        self._s._apply_reduce(reduce)
        self._turns: List[_Turn] = []     # the turns in the KV cache
        self._tokens: List[int] = []      # the conversation's tokens in the KV cache
        self._images: List[ImageLike] = []
        self._pending = _Pending()
        self._seq_id: Optional[int] = None
        self._stream: Optional[Iterator[str]] = None
        self._done: Optional[Callable[[str], None]] = None

    def ask(self, question: str, image: Optional[ImageLike] = None, *, stream: bool = False,
            max_tokens: Optional[int] = None) -> Union[str, Iterator[str]]:
        """The model's answer to the next user turn (with an optional image); stream as in Model.chat."""
        m = self._s
        n = self.max_tokens if max_tokens is None else _max_tokens(max_tokens)
        with m._lock:
            m._begin()
            self._finish_stream()
            images = as_image_list(image)
            turn = _Turn(m.chat_prompt(question, len(images)), images)
            if self._turns:
                sep = list(self._pending.tokens)
                if not (sep and m.is_eog(sep[-1])):
                    sep.append(int(m.info["eos_token_id"]))
                self._turns[-1].sep = sep
            try:
                if self._turns and self._seq_id == m._seq_id:
                    new = self._turns[-1].sep + m.tokenize(turn.text, add_special=False)
                    try:
                        m._prefill(new, images)
                        self._tokens += new
                        self._images += images
                    except VtrimContextFullError:
                        self._rebuild(turn)
                else:
                    self._rebuild(turn)
                self._turns.append(turn)
            except BaseException:  # an error or Ctrl-C: what the KV cache holds is not known for sure
                self._seq_id = None
                raise
            self._seq_id = m._seq_id

            pending = self._pending = _Pending()

            def done(answer: str) -> None:
                turn.reply = list(pending.decoded)
                self._tokens += pending.decoded
                self.history.append((question, answer))
                if pending.broken:  # the KV cache may not be what was recorded: rebuild at the next turn
                    self._seq_id = None
                self._done = None

            self._done = done
            pieces = m._text_pieces(m._sample_tokens(self._sampler, n, pending), on_done=done)
            if not stream:
                return "".join(pieces)
            self._stream = pieces
            return pieces

    def _conversation(self, turns: List[_Turn]) -> Tuple[List[int], List[ImageLike]]:
        m = self._s
        tokens: List[int] = []
        images: List[ImageLike] = []
        for i, t in enumerate(turns):
            tokens += m.tokenize(t.text, add_special=(i == 0)) + t.reply + (t.sep if i + 1 < len(turns) else [])
            images += t.images
        return tokens, images

    def _rebuild(self, turn: _Turn) -> None:
        """A fresh sequence with the kept turns and `turn`, dropping the oldest turns while it does not fit."""
        m = self._s
        for drop in range(len(self._turns) + 1):
            kept = self._turns[drop:]
            tokens, images = self._conversation(kept + [turn])
            m._apply_reduce(self._reduce)
            m._reset()
            try:
                m._prefill(tokens, images)
            except VtrimContextFullError:
                if drop < len(self._turns):
                    continue
                self._seq_id = None  # the sequence is gone; the next turn rebuilds what is kept
                raise
            self.turns_dropped += drop
            self._turns = kept
            self._tokens, self._images = tokens, images
            return

    def _finish_stream(self) -> None:
        """Ends the previous turn's stream if it was not read to the end (its reply stays as far as read)."""
        stream, done, self._stream = self._stream, self._done, None
        if stream is not None:
            stream.close()  # runs its `finally` (and `done`) if it had started
        if self._done is not None and done is not None:
            done("")

    def close(self) -> None:
        self._finish_stream()
        self._sampler.close()

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
