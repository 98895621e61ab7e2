"""OpenAI-style chat messages -> the model's prompt text and its images.

Messages are dicts with a role ("system", "user", "assistant") and a content: a string, or a list of parts
{"type": "text", "text": ...} and {"type": "image_url", "image_url": {"url": U}} where U is a data: URL
(base64) or a local file path (or file:// URL); Python callers may also give {"type": "image", "image": X}
with any image pyvtrim takes (a path, bytes, a PIL image, an RGB uint8 array).

The prompt follows the chat template of the model's Hugging Face processor (the one its GGUF carries):
  llava-1.5 (llava-hf/llava-1.5-*-hf): "USER: <image>\\nQ ASSISTANT: A USER: Q2 ASSISTANT:"; a system
      message is its text and a space, with no role prefix; each message's images come before its text.
  llama-3.2-vision: "<|begin_of_text|>" then "<|start_header_id|>ROLE<|end_header_id|>\\n\\n...<|eot_id|>"
      per message; without images a system block with the template's knowledge-cutoff and date lines comes
      first; a system message together with images raises ValueError (as the template does).
Everything the runtime's templates cannot say raises VtrimValueError naming the message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .errors import VtrimValueError, file_not_found
from .images import is_image, pixels_of

ROLES = ("system", "user", "assistant")
MLLAMA_DATE = "26 Jul 2024"   # the template's default date_string


@dataclass
class Message:
    role: str
    parts: List[Tuple[str, Any]] = field(default_factory=list)   # ("text", str) | ("image", bytes or image)
    is_string: bool = False   # the content was a string (templates treat it apart: mllama's trims it)

    @property
    def texts(self) -> List[str]:
        return [v for k, v in self.parts if k == "text"]

    @property
    def images(self) -> List[Any]:
        return [v for k, v in self.parts if k == "image"]


def image_from_url(url: Any, where: str) -> bytes:
    """The encoded bytes of an image_url: a data: URL or a local path."""
    if not isinstance(url, str) or not url:
        raise VtrimValueError(f"{where}: image_url.url must be a non-empty string")
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise VtrimValueError(f"{where}: a data: URL must be base64 (data:image/png;base64,...)")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise VtrimValueError(f"{where}: the data: URL is not valid base64 ({e})") from e
        if not raw:
            raise VtrimValueError(f"{where}: the data: URL holds no bytes")
        return raw
    if url.startswith(("http://", "https://")):
        raise VtrimValueError(f"{where}: remote image URLs are not fetched; send a data: URL or a local path")
    path = url[len("file://"):] if url.startswith("file://") else url
    if not os.path.isfile(path):
        raise file_not_found(path, f"{where}: no such image file: {path!r}")
    with open(path, "rb") as f:
        return f.read()


def image_key(image: Any) -> str:
    """A content hash of an image: equal images (same bytes, or same pixels) give equal keys."""
    h = hashlib.sha256()
    if isinstance(image, (bytes, bytearray, memoryview)):
        h.update(b"bytes:")
        h.update(bytes(image))
    elif isinstance(image, (str, os.PathLike)):
        h.update(b"bytes:")
        with open(os.fspath(image), "rb") as f:
            h.update(f.read())
    else:
        px = pixels_of(image)
        h.update(f"pixels:{px.shape}:".encode())
        h.update(np.ascontiguousarray(px).tobytes())
    return h.hexdigest()


def _part(part: Any, where: str) -> Tuple[str, Any]:
    if not isinstance(part, dict):
        raise VtrimValueError(f"{where}: a content part must be an object with a 'type'")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise VtrimValueError(f"{where}: a text part needs a string 'text'")
        return "text", text
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        return "image", image_from_url(url, where)
    if kind == "image":
        image = part.get("image")
        if not is_image(image):
            raise VtrimValueError(f"{where}: an image part needs 'image' (a path, bytes, a PIL image or an array)")
        if isinstance(image, (str, os.PathLike)):
            return "image", image_from_url(os.fspath(image), where)
        return "image", image
    raise VtrimValueError(f"{where}: unsupported content part type {kind!r} (text, image_url)")


def parse(messages: Any) -> List[Message]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise VtrimValueError("messages must be a non-empty list")
    out: List[Message] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise VtrimValueError(f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise VtrimValueError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        msg = Message(role)
        if isinstance(content, str):
            msg.parts.append(("text", content))
            msg.is_string = True
        elif isinstance(content, (list, tuple)):
            msg.parts += [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
        else:
            raise VtrimValueError(f"{where}: content must be a string or a list of parts")
        if role != "user" and msg.images:
            raise VtrimValueError(f"{where}: only user messages may hold images")
        out.append(msg)
    if out[-1].role == "assistant":
        raise VtrimValueError("the last message must be a user (or system) message: the reply comes after it")
    return out


def render_llava(msgs: Sequence[Message], image: str) -> str:
    text = ""
    for m in msgs:
        if m.role != "system":
            text += m.role.upper() + ": "
        text += "".join(image + "\n" for _ in m.images)
        text += "".join(t + " " for t in m.texts)
    return text + "ASSISTANT:"


def render_mllama(msgs: Sequence[Message], image: str) -> str:
    system = ""
    if msgs[0].role == "system":
        texts = msgs[0].texts   # the template takes a string, or the first part's text
        system = (texts[0] if texts else "").strip()
        msgs = msgs[1:]
    has_images = any(m.images for m in msgs)
    if has_images and system:
        raise VtrimValueError("Llama-3.2-Vision's chat template does not take a system message with images")
    text = "<|begin_of_text|>"
    if not has_images:
        text += ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                 f"Today Date: {MLLAMA_DATE}\n\n{system}<|eot_id|>")
    for m in msgs:
        text += f"<|start_header_id|>{m.role}<|end_header_id|>\n\n"
        if m.is_string:  # the template trims a string content, not text parts
            text += m.parts[0][1].strip()
        else:
            text += "".join(image if k == "image" else v for k, v in m.parts)
        text += "<|eot_id|>"
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def render(arch: str, msgs: Sequence[Message], image: str) -> Tuple[str, bool]:
    """The prompt text and whether it already holds BOS (so tokenize it without add_special)."""
    if arch == "mllama":
        return render_mllama(msgs, image), True
    return render_llava(msgs, image), False


def image_placeholder(arch: str) -> str:
    return "<|image|>" if arch == "mllama" else "<image>"


def conversation(arch: str, messages: Any) -> Tuple[str, bool, List[Any]]:
    """(prompt text, holds BOS, images in order) of OpenAI-style messages."""
    msgs = parse(messages)
    text, has_bos = render(arch, msgs, image_placeholder(arch))
    return text, has_bos, [im for m in msgs for im in m.images]


def policy_from_dict(spec: Dict[str, Any]) -> Any:
    """A reduction policy from {"method": "fastv", "k": 2, "ratio": 0.5}: the method's name as
    ``last_stats["stages"]`` reports it, with its policy class's keyword arguments."""
    from .reduce import FastV, FiCoCoL, FiCoCoV, TrimCrossAttn, VLCache

    methods = {"fastv": FastV, "trim": TrimCrossAttn, "ficoco_v": FiCoCoV, "ficoco_l": FiCoCoL, "vlcache": VLCache}
    if not isinstance(spec, dict) or spec.get("method") not in methods:
        raise VtrimValueError(f"a reduction must be an object with method one of {sorted(methods)}, got {spec!r}")
    args = {k: v for k, v in spec.items() if k != "method"}
    try:
        return methods[spec["method"]](**args)
    except TypeError as e:
        raise VtrimValueError(f"reduction {spec['method']}: {e}") from e
