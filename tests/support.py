"""Shared test fixtures: a real fake backend, the real proxy over real TLS, real clients.

Everything binds 127.0.0.1 port 0 and reads the port back from the socket. Servers run
serve_forever() in daemon threads and are stopped with addCleanup.
"""

import http.client
import importlib
import io
import json
import logging
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import proxy  # noqa: E402

# Request logs go to a buffer; tests/run.py prints it for failing tests only.
LOG_BUFFER = io.StringIO()
_log_handler = logging.StreamHandler(LOG_BUFFER)
_log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
proxy.log.handlers[:] = [_log_handler]
proxy.log.setLevel(logging.DEBUG)
proxy.log.propagate = False

_CERTS = {}
_CERTS_LOCK = threading.Lock()


def certs_dir() -> str:
    """A directory with a CA and a server certificate for localhost/127.0.0.1, made once per run."""
    with _CERTS_LOCK:
        if "dir" not in _CERTS:
            path = tempfile.mkdtemp(prefix="llm-proxy-test-certs-")
            proxy.ensure_certificates(os.path.join(path, "cert.pem"), os.path.join(path, "key.pem"))
            _CERTS["dir"] = path
            import atexit
            atexit.register(shutil.rmtree, path, True)
        return _CERTS["dir"]


def ca_file() -> str:
    return os.path.join(certs_dir(), "ca.pem")


def client_context() -> ssl.SSLContext:
    """A strict client context that trusts only the test CA (as a browser with the CA installed)."""
    context = ssl.create_default_context(cafile=ca_file())
    context.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
    return context


class RecordedRequest:
    """What the fake backend received for one request."""

    def __init__(self, method, path, version, headers, body):
        self.method = method
        self.path = path
        self.version = version
        self.headers = headers          # list of (name, value) as received
        self.body = body

    def header(self, name):
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self):
        return [key.lower() for key, _ in self.headers]


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True   # headers and body go out in two writes

    def handle_one_request(self):
        # Read the whole request (Content-Length or chunked), record it, then let the test's
        # responder answer.
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except OSError:
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        if not self.parse_request():
            return
        try:
            body = self._read_body()
        except (ValueError, OSError):
            # A broken or cut-off body is never recorded as a request: tests rely on that.
            self.close_connection = True
            return
        request = RecordedRequest(self.command, self.path, self.request_version,
                                  list(self.headers.items()), body)
        self.server.requests.append(request)
        try:
            self.server.responder(self, request)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _read_body(self) -> bytes:
        body = b""
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks = []
            while True:
                line = self.rfile.readline()
                if not line.endswith(b"\n"):
                    raise ValueError("chunked body cut short")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunk = self.rfile.read(size)
                if len(chunk) != size or self.rfile.readline() != b"\r\n":
                    raise ValueError("chunked body cut short")
                chunks.append(chunk)
            body = b"".join(chunks)
        elif self.headers.get("Content-Length"):
            length = int(self.headers["Content-Length"])
            body = self.rfile.read(length)
            if len(body) != length:
                raise ValueError("body cut short")
        return body

    def log_message(self, *args):
        pass

    # Helpers for responders.
    def send_json(self, status, payload, headers=()):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def start_chunked(self, status=200, content_type="text/event-stream", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()

    def send_chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_chunked(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def echo_responder(handler, request):
    """Answer with a JSON description of the request."""
    handler.send_json(200, {"method": request.method, "path": request.path,
                            "headers": request.headers, "bodyLength": len(request.body)})


class FakeUpstream(ThreadingHTTPServer):
    """A real HTTP/1.1 backend on an ephemeral port; records requests and connections."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, responder=echo_responder):
        self.requests = []
        self.connections = 0
        self.responder = responder
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)

    def handle_error(self, request, client_address):
        pass    # tests provoke broken connections on purpose

    def get_request(self):
        conn, addr = super().get_request()
        self.connections += 1
        return conn, addr

    @property
    def port(self):
        return self.server_address[1]


def optional_import(name: str):
    """The module `name`, or None where this machine lacks it (tests that need it skip)."""
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover - depends on the machine
        return None


def start_upstream(test: unittest.TestCase, responder=echo_responder) -> FakeUpstream:
    upstream = FakeUpstream(responder)
    _serve_in_thread(test, upstream)
    return upstream


def _serve_in_thread(test, server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(5)
    test.addCleanup(stop)


def make_config(upstream_port=1, **overrides) -> proxy.Config:
    """A Config for tests: loopback only, test certificates, a temp stats file.

    Built as production builds it (checked, converted, the rest on the SETTINGS defaults);
    `overrides` are named by Config attribute (admin_token="t", access_keys=(AccessKey, ...)).
    """
    directory = certs_dir()
    values = dict(port=0, bind="127.0.0.1", target_host="127.0.0.1", target_port=upstream_port,
                  cert_file=os.path.join(directory, "cert.pem"),
                  key_file=os.path.join(directory, "key.pem"),
                  stats_file=os.path.join(tempfile.mkdtemp(prefix="llm-proxy-stats-"), "stats.json"),
                  client_timeout=10.0, connect_timeout=2.0, read_timeout=10.0)
    values.update(overrides)
    return proxy.config_from(settings_of(**values))


def settings_of(**attributes) -> dict:
    """{dotted key: JSON value} for proxy.config_from(), from Config attribute names and values."""
    key_of = {s.attr: s.key for s in proxy.SETTINGS}
    settings = {}
    for attr, value in attributes.items():
        if attr == "access_keys":
            value = {k.name: {"key": k.key, "dailyTokens": k.daily_tokens,
                              "requestsPerMinute": k.requests_per_minute} for k in value}
        elif isinstance(value, tuple):
            value = list(value)
        settings[key_of[attr]] = value
    return settings


def start_proxy(test: unittest.TestCase, upstream_port=1, **overrides) -> "proxy.ProxyServer":
    """The real proxy over real TLS, serving in a thread until the test ends."""
    server = proxy.build_server(make_config(upstream_port, **overrides))
    # Cleanups run last-in first-out: stop serving, let requests finish, then close the pool.
    test.addCleanup(server.upstream.close_all)
    test.addCleanup(server.wait_for_requests, 5)
    _serve_in_thread(test, server)
    return server


def https(server, timeout=10.0) -> http.client.HTTPSConnection:
    """An HTTPS client connection to the proxy that verifies the certificate strictly."""
    return http.client.HTTPSConnection("localhost", server.server_address[1],
                                       context=client_context(), timeout=timeout)


def tls_socket(server, timeout=10.0) -> ssl.SSLSocket:
    """A raw TLS socket to the proxy, for hand-written requests."""
    raw = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=timeout)
    return client_context().wrap_socket(raw, server_hostname="localhost")


def read_http_response(sock, max_bytes=1 << 20) -> bytes:
    """Read from a socket until the peer closes or max_bytes arrive (for raw-protocol tests)."""
    data = b""
    try:
        while len(data) < max_bytes:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    except (socket.timeout, ConnectionResetError, ssl.SSLError):
        pass
    return data


def settled_stats(server) -> dict:
    """The stats snapshot once no forwarded request is in flight.

    The proxy records a request just after the client has its last byte, so a client that asks
    for stats at once could otherwise race the record of its own request.
    """
    wait_until(lambda: server.stats.snapshot()["inFlight"] == 0)
    return server.stats.snapshot()


def small_buffer_socketpair(test: unittest.TestCase):
    """A connected socket pair, closed when the test ends, whose first socket's kernel send
    buffer is 4 KB: a large send() takes only part, as over a slow network."""
    left, right = socket.socketpair()
    test.addCleanup(left.close)
    test.addCleanup(right.close)
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return left, right


def received_while(sock, length: int, send) -> bytes:
    """What `sock` receives while send() runs: read in a thread until `length` bytes or the end."""
    got = bytearray()

    def drain():
        while len(got) < length:
            piece = sock.recv(65536)
            if not piece:
                return
            got.extend(piece)
    reader = threading.Thread(target=drain)
    reader.start()
    send()
    reader.join(30)
    return bytes(got)


def wait_until(predicate, timeout=5.0, interval=0.01) -> bool:
    """Poll `predicate` until it is true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# --------------------------------------------------------------------------------------------------
# A fake LLM backend speaking the real wire formats (OpenAI, Anthropic, Ollama), with usage.
# --------------------------------------------------------------------------------------------------

def _sse(event_type, payload) -> bytes:
    head = b"event: %s\n" % event_type.encode() if event_type else b""
    return head + b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class FakeLLM:
    """Answers like the real APIs and adds up the tokens it reported, for exact comparisons.

    Token counts are derived from the request (prompt = characters of the last message, capped)
    so every request reports different numbers. `emitted` is what a correct proxy must count.
    """

    def __init__(self, model_override=None):
        self.model_override = model_override
        self.emitted = {"prompt": 0, "completion": 0, "cacheRead": 0, "cacheWrite": 0,
                        "requests": 0}
        self.lock = threading.Lock()

    def _count(self, prompt, completion, cache_read=0, cache_write=0):
        with self.lock:
            self.emitted["prompt"] += prompt
            self.emitted["completion"] += completion
            self.emitted["cacheRead"] += cache_read
            self.emitted["cacheWrite"] += cache_write
            self.emitted["requests"] += 1

    def __call__(self, handler, request):
        body = json.loads(request.body or b"{}")
        model = self.model_override or body.get("model", "test-model")
        words = ["Hello", " from", " the", " fake", " model", "."]
        path = request.path.split("?")[0]
        prompt = 7 + len(json.dumps(body.get("messages", body.get("prompt", "")))) % 50
        completion = len(words)
        if path.endswith("/chat/completions"):
            self._openai_chat(handler, body, model, words, prompt, completion)
        elif path.endswith("/v1/messages"):
            self._anthropic(handler, body, model, words, prompt, completion)
        elif path.endswith("/api/chat"):
            self._ollama_chat(handler, body, model, words, prompt, completion)
        elif path.endswith("/v1/models") or path.endswith("/api/tags"):
            handler.send_json(200, {"object": "list", "data": [{"id": model, "object": "model"}],
                                    "models": [{"name": model}]})
        else:
            handler.send_json(404, {"error": {"message": "no route %s" % path}})

    def _openai_chat(self, handler, body, model, words, prompt, completion):
        created = 1764190000
        cached = prompt // 3
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                               "accepted_prediction_tokens": 0,
                                               "rejected_prediction_tokens": 0}}
        if not body.get("stream"):
            self._count(prompt, completion, cache_read=cached)
            handler.send_json(200, {
                "id": "chatcmpl-fake1", "object": "chat.completion", "created": created,
                "model": model, "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words),
                                                     "refusal": None, "annotations": []},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage, "service_tier": "default"},
                headers=[("x-request-id", "req_fake_1"), ("openai-processing-ms", "12")])
            return
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        handler.start_chunked(headers=[("x-request-id", "req_fake_2")])
        base = {"id": "chatcmpl-fake2", "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": "fp_fake"}

        def chunk(choices, usage_value="absent"):
            event = dict(base, choices=choices)
            if include:
                event["usage"] = None if usage_value == "absent" else usage_value
            return _sse(None, event)

        handler.send_chunk(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}]))
        for word in words:
            handler.send_chunk(chunk([{"index": 0, "delta": {"content": word}, "logprobs": None,
                                       "finish_reason": None}]))
        handler.send_chunk(chunk([{"index": 0, "delta": {}, "logprobs": None,
                                   "finish_reason": "stop"}]))
        if include:
            self._count(prompt, completion, cache_read=cached)
            handler.send_chunk(chunk([], usage))
        else:
            self._count(0, 0)
        handler.send_chunk(b"data: [DONE]\n\n")
        handler.end_chunked()

    def _anthropic(self, handler, body, model, words, prompt, completion):
        cache_read, cache_write = 100, 20
        usage = {"input_tokens": prompt, "cache_creation_input_tokens": cache_write,
                 "cache_read_input_tokens": cache_read, "output_tokens": completion,
                 "service_tier": "standard"}
        self._count(prompt + cache_read + cache_write, completion, cache_read, cache_write)
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": "".join(words)}],
                   "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            handler.send_json(200, message, headers=[("request-id", "req_fake_3")])
            return
        handler.start_chunked(headers=[("request-id", "req_fake_4")])
        start = dict(message, content=[], stop_reason=None,
                     usage=dict(usage, output_tokens=1))
        handler.send_chunk(_sse("message_start", {"type": "message_start", "message": start}))
        handler.send_chunk(_sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                        "content_block": {"type": "text", "text": ""}}))
        handler.send_chunk(_sse("ping", {"type": "ping"}))
        for word in words:
            handler.send_chunk(_sse("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": word}}))
        handler.send_chunk(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        # Newer servers repeat the cumulative input/cache counts here: never add them twice.
        handler.send_chunk(_sse("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"input_tokens": prompt, "cache_creation_input_tokens": cache_write,
                      "cache_read_input_tokens": cache_read, "output_tokens": completion}}))
        handler.send_chunk(_sse("message_stop", {"type": "message_stop"}))
        handler.end_chunked()

    def _ollama_chat(self, handler, body, model, words, prompt, completion):
        self._count(prompt, completion)
        final = {"model": model, "created_at": "2026-11-26T20:00:00.000Z",
                 "message": {"role": "assistant", "content": ""}, "done": True,
                 "done_reason": "stop", "total_duration": 123456789, "load_duration": 1234567,
                 "prompt_eval_count": prompt, "prompt_eval_duration": 2345678,
                 "eval_count": completion, "eval_duration": 98765432}
        if body.get("stream", True) is False:
            final["message"]["content"] = "".join(words)
            handler.send_json(200, final)
            return
        handler.start_chunked(content_type="application/x-ndjson")
        for word in words:
            line = {"model": model, "created_at": "2026-11-26T20:00:00.000Z",
                    "message": {"role": "assistant", "content": word}, "done": False}
            handler.send_chunk(json.dumps(line).encode() + b"\n")
        handler.send_chunk(json.dumps(final).encode() + b"\n")
        handler.end_chunked()
