"""pyvtrim serve against the official openai client: a real uvicorn server on 127.0.0.1 (a free port, in a
subprocess) on the tiny LLaVA fixture, --parallel 2 with a small queue."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")

import pyvtrim  # noqa: E402
from pyvtrim import _ffi  # noqa: E402

try:
    _ffi.get()
except pyvtrim.VtrimLibraryError as e:
    pytest.skip(f"libvtrim not available: {e}", allow_module_level=True)

IMAGE = np.random.default_rng(7).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)


def data_url(arr) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


URL = data_url(IMAGE)


def user(text, image=True):
    parts = [{"type": "image_url", "image_url": {"url": URL}}] if image else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, gguf, parallel=2, queue=4):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvtrim", "serve", str(gguf), "--port", str(self.port), "--parallel",
             str(parallel), "--queue", str(queue), "--n-ctx", "512", "--threads", "1", "--model-name", "tiny",
             "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited: " + self.proc.stdout.read())
            try:
                if self.get("/health")["status"] == "ok":
                    return
            except (OSError, ValueError):
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return json.loads(r.read())

    def post(self, body: bytes):
        req = urllib.request.Request(self.base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(llava_tiny):
    s = Server(llava_tiny.gguf)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=120)


def test_models_and_health(server, client) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = server.get("/health")
    assert h["sessions"] == 2 and h["busy"] == 0


def test_completion_with_an_image_stream_and_not(client) -> None:
    kw = dict(model="tiny", messages=[user("What is it?")], max_tokens=10, temperature=0.7, seed=4)
    r = client.chat.completions.create(**kw)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 25
    extra = r.usage.model_extra["pyvtrim"]
    assert extra["n_images"] == 1 and extra["t_encode_ms"] > 0
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_multi_turn_hits_the_prefix_cache(client) -> None:
    conv = [{"role": "system", "content": "Answer briefly."}, user("What is it?")]
    r1 = client.chat.completions.create(model="tiny", messages=conv, max_tokens=6, temperature=0)
    conv += [{"role": "assistant", "content": r1.choices[0].message.content}, user("And the colour?", False)]
    r2 = client.chat.completions.create(model="tiny", messages=conv, max_tokens=6, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached > 25, cached                      # the first turn, image included, was kept
    extra = r2.usage.model_extra["pyvtrim"]
    assert extra["n_images"] == 0 and extra["prefilled_tokens"] == r2.usage.prompt_tokens - cached


def test_reduce_extension_reports_its_stages(client) -> None:
    r = client.chat.completions.create(model="tiny", messages=[user("What is it?")], max_tokens=2,
                                       extra_body={"pyvtrim": {"reduce": [{"method": "fastv", "k": 1,
                                                                           "ratio": 0.5}]}})
    stages = r.usage.model_extra["pyvtrim"]["stages"]
    assert stages[0]["method"] == "fastv" and stages[0]["n_kept"] == int(0.5 * stages[0]["n_in"])


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[]", 400, "JSON object"),
    (b'{"messages": []}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', 400, "top_p"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "'n'"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', 400, "role"),
    (b'{"messages": [{"role": "user", "content": "x"}], "pyvtrim": {"reduce": [{"method": "fastv", "k": 99}]}}',
     400, "k"),
])
def test_malformed_bodies_get_openai_style_400s(server, body, status, needle) -> None:
    code, out, _ = server.post(body)
    assert code == status
    assert needle in out["error"]["message"] and out["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in json.dumps(out)


def test_corrupt_image_and_oversized_prompt(client) -> None:
    bad = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", max_tokens=1, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": bad}}, {"type": "text", "text": "x"}]}])
    assert e.value.body["code"] == "invalid_image" and "Traceback" not in str(e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", max_tokens=1, messages=[
            {"role": "user", "content": "word " * 800}])
    assert e.value.body["code"] == "context_length_exceeded"


def test_a_client_that_leaves_mid_stream_frees_its_session(server, client) -> None:
    cancelled = server.get("/health")["cancelled"]
    for _ in range(3):  # more than --parallel: a session kept by a gone client would block the third
        stream = client.chat.completions.create(model="tiny", messages=[user("Talk.")], max_tokens=400,
                                                temperature=1.0, seed=1, stream=True)
        for i, _chunk in enumerate(stream):
            if i == 2:
                break
        stream.close()
    deadline = time.time() + 30
    while server.get("/health")["busy"] and time.time() < deadline:
        time.sleep(0.1)
    h = server.get("/health")
    assert h["busy"] == 0 and h["cancelled"] == cancelled + 3   # stopped by the disconnect, not run to the end
    r = client.chat.completions.create(model="tiny", messages=[user("What is it?")], max_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_bounded_load(server) -> None:
    """64 requests from 8 clients at once (2 sessions + 4 queued): each answered or refused with 503."""
    body = json.dumps({"messages": [user("What is it?")], "max_tokens": 8, "temperature": 0.5}).encode()

    def one(_):
        return server.post(body)

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(64)))
    codes = [c for c, _, _ in results]
    assert len(codes) == 64 and set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 6
    for code, out, headers in results:
        if code == 503:
            assert headers.get("retry-after") == "1" and out["error"]["code"] == "queue_full"
        else:
            assert out["choices"][0]["message"]["role"] == "assistant"
    deadline = time.time() + 30   # a worker gives its session back just after its answer went out
    while server.get("/health")["busy"] and time.time() < deadline:
        time.sleep(0.1)
    h = server.get("/health")
    assert (h["status"], h["busy"], h["waiting"]) == ("ok", 0, 0)


def test_ctrl_c_stops_a_running_generation_and_the_server(llava_tiny) -> None:
    """SIGINT while a stream is open: the generation stops at its next step (uvicorn alone would wait for it)
    and the server exits with 130 (Ctrl-C's status, as every pyvtrim command), no traceback."""
    s = Server(llava_tiny.gguf, parallel=1, queue=1)
    try:
        client = openai.OpenAI(base_url=s.base + "/v1", api_key="none", max_retries=0, timeout=60)
        ask = dict(model="tiny", messages=[user("Talk.")], max_tokens=400, temperature=1.0, seed=1)
        # the same request, run to its end, is long: so a short stream below was cut by the signal
        assert client.chat.completions.create(**ask).usage.completion_tokens >= 390
        stream = client.chat.completions.create(**ask, stream=True)
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        t0 = time.time()
        s.proc.send_signal(signal.SIGINT)
        rest = 0
        try:
            for _chunk in chunks:
                rest += 1
        except (openai.APIError, OSError):
            pass   # the connection may be cut rather than ended
        rc = s.proc.wait(timeout=30)
        took = time.time() - t0
        out = s.proc.stdout.read()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
    assert rc == 130, out
    assert "Traceback" not in out, out
    assert rest < 390, rest   # cancelled, not run to max_tokens
    assert took < 30
