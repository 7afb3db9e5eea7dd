"""Hostile clients and hostile backends (issue 8): the proxy stays up, frees what it took, and
never lets one request leak into another.

Everything runs on 127.0.0.1 with real sockets and real TLS. Each test says which bug would make
it fail. The two soak tests (10,000 garbage connections, 30 kill -9 runs) run only with
LLM_PROXY_SOAK=1 (.ci/run sets it), so the default suite stays quick. Knobs (defaults are the
issue's figures; with the soak tests the file takes about a minute on 2 cores):

    HOSTILE_GARBAGE_CONNECTIONS=10000   connections of garbage in GarbageTests (~9 s)
    HOSTILE_KILL_RUNS=30                kill -9 runs in StatsDurabilityTests (~20 s, 3 in parallel)
    HOSTILE_FUZZ_CASES=20000            mutated requests in ParserFuzzTests (~0.5 s)
    HOSTILE_SEED=20261126               seed of the fuzzer and of the kill moments
    HOSTILE_REPORT=1                    print the figures (connections, kills, losses) to stderr

"""

import http.client
import io
import json
import logging
import os
import random
import re
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from support import (proxy, ROOT, start_upstream, start_proxy, https, tls_socket, wait_until,
                     client_context, certs_dir, echo_responder)

GARBAGE_CONNECTIONS = int(os.environ.get("HOSTILE_GARBAGE_CONNECTIONS", "10000"))
KILL_RUNS = int(os.environ.get("HOSTILE_KILL_RUNS", "30"))
# Soak tests: long loops that prove "nothing leaks, nothing tears" under volume.
soak = unittest.skipUnless(os.environ.get("LLM_PROXY_SOAK") == "1",
                           "soak test: set LLM_PROXY_SOAK=1 to run it (.ci/run does)")
PROXY_SCRIPT = os.path.join(ROOT, "proxy.py")


# ==================================================================================================
# Helpers: counting resources, raw exchanges, a backend whose every fault the test scripts
# ==================================================================================================

def fd_count() -> int:
    """Open file descriptors of this process (the proxy under test runs in it)."""
    return len(os.listdir("/proc/self/fd"))


def needs_proc(test):
    if not os.path.isdir("/proc/self/fd"):
        test.skipTest("needs /proc/self/fd to count file descriptors")


def request(server, method, target, body=None, headers=None, timeout=10.0):
    """One request on a fresh HTTPS connection: (response, body)."""
    conn = https(server, timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def raw_exchange(server, data: bytes, timeout: float = 5.0):
    """Send raw bytes over TLS; read until the proxy closes. Returns (reply, closed_by_proxy)."""
    sock = tls_socket(server, timeout)
    reply = b""
    closed = False
    try:
        sock.sendall(data)
        while True:
            piece = sock.recv(65536)
            if not piece:
                closed = True
                break
            reply += piece
    except socket.timeout:
        pass                        # the proxy kept the connection open
    except (ConnectionError, ssl.SSLError):
        closed = True
    finally:
        sock.close()
    return reply, closed


def status_of(reply: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", reply)
    return int(match.group(1)) if match else 0


def heads_and_statuses(reply: bytes):
    """Status codes of every response in a byte stream of Content-Length-framed responses."""
    statuses = []
    while reply:
        head, sep, rest = reply.partition(b"\r\n\r\n")
        if not sep:
            break
        statuses.append(status_of(head + b"\r\n"))
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        size = int(length.group(1)) if length else 0
        reply = rest[size:]
    return statuses


def errors(server) -> int:
    return server.stats.snapshot()["errors"]


def abort(sock) -> None:
    """Close with a TCP reset instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class LogCapture(logging.Handler):
    """Collects the proxy logger's records (and its formatted text) for one test."""

    def __init__(self, test, level=logging.DEBUG):
        super().__init__(level)
        self.records = []
        self.text = io.StringIO()
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        self._lock_records = threading.Lock()
        old_level = proxy.log.level
        proxy.log.addHandler(self)
        proxy.log.setLevel(logging.DEBUG)
        test.addCleanup(proxy.log.setLevel, old_level)
        test.addCleanup(proxy.log.removeHandler, self)

    def emit(self, record):
        text = self.format(record)
        with self._lock_records:
            self.records.append(record)
            self.text.write(text + "\n")

    def unexpected(self):
        """Tracebacks of exceptions that escaped a handler (socketserver's handle_error)."""
        with self._lock_records:
            return [self.format(r) for r in self.records
                    if r.exc_info or "unexpected" in r.getMessage()]


class IncompleteRequest(Exception):
    """The connection ended (or broke the framing) inside a request."""


def _read_backend_request(reader):
    """One request read strictly to its end: (head, body); None at a clean end of stream.

    Raises IncompleteRequest when the stream ends or the framing breaks inside a request."""
    head = b""
    while True:
        line = reader.readline(65537)
        if not line and not head:
            return None
        if not line.endswith(b"\r\n"):
            raise IncompleteRequest()
        head += line
        if line == b"\r\n":
            break
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while True:
            line = reader.readline(1000)
            if not re.match(rb"[0-9a-fA-F]+\r\n\Z", line):
                raise IncompleteRequest()
            size = int(line, 16)
            if not size:
                if reader.readline(1000) != b"\r\n":
                    raise IncompleteRequest()
                return head, body
            data = reader.read(size + 2)
            if len(data) < size + 2 or not data.endswith(b"\r\n"):
                raise IncompleteRequest()
            body += data[:-2]
    length = int(fields.get(b"content-length", b"0"))
    body = reader.read(length) if length else b""
    if len(body) < length:
        raise IncompleteRequest()
    return head, body


def answer_ok(backend, sock, request, n):
    """A well-behaved backend: a small JSON answer on a keep-alive connection."""
    body = b'{"ok":true,"n":%d}' % n
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return True


class ScriptedBackend:
    """A socket-level fake backend for the faults support.FakeUpstream cannot produce.

    `behaviour(backend, sock, request, n)` answers each request (n counts requests on the
    connection from 1) and returns False to end the connection. Only requests read to their
    end are appended to `requests`; `partial` counts connections that ended inside a request.
    `ended` holds the monotonic time each connection ended, `raw` every byte received per
    connection. Stalling behaviours wait on `release`, which cleanup sets.
    """

    def __init__(self, test, behaviour=answer_ok, listener=None):
        self.behaviour = behaviour
        self.requests = []
        self.raw = []
        self.partial = 0
        self.ended = []
        self.connections = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.go = threading.Event()     # a behaviour may wait for the test's signal
        if listener is None:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
        self.listener = listener
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._threads = []
        self._sockets = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        test.addCleanup(self.close, accept)

    def close(self, accept):
        self.release.set()
        accept.join(5)
        self.listener.close()
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)     # wakes a thread blocked reading it
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(5)

    def _accept(self):
        # Polls: closing a socket does not wake a thread blocked in accept() on every OS.
        self.listener.settimeout(0.05)
        while not self.release.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(None)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._sockets.append(sock)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock):
        with self.lock:
            self.connections += 1
            received = bytearray()
            self.raw.append(received)
        reader = io.BufferedReader(_RecordingReader(sock, received), 65536)
        sock.settimeout(30)
        n = 0
        try:
            while True:
                try:
                    request = _read_backend_request(reader)
                except IncompleteRequest:
                    with self.lock:
                        self.partial += 1
                    break
                if request is None:
                    break
                n += 1
                with self.lock:
                    self.requests.append(request)
                if not self.behaviour(self, sock, request, n):
                    break
        except (OSError, ValueError):
            pass
        finally:
            with self.lock:
                self.ended.append(time.monotonic())
            sock.close()

    def paths(self):
        with self.lock:
            return [head.split(b" ", 2)[1].decode() for head, _ in self.requests]


class _RecordingReader(io.RawIOBase):
    """Raw socket reader that keeps a copy of every byte (for ScriptedBackend.raw)."""

    def __init__(self, sock, received):
        self.sock = sock
        self.received = received

    def readable(self):
        return True

    def readinto(self, buffer):
        count = self.sock.recv_into(buffer)
        self.received += bytes(buffer[:count])
        return count


def start_quiet_proxy(test, upstream_port, **overrides):
    """support.start_proxy, plus a cleanup that first lets in-flight requests finish: a worker
    may put its backend connection back in the pool after the client has read its answer,
    and that connection must be closed too (else a ResourceWarning in a later test)."""
    server = start_proxy(test, upstream_port, **overrides)

    def drain():
        server.wait_for_requests(5)
        server.upstream.close_all()
    test.addCleanup(drain)
    return server


def warm_up(test, server) -> None:
    """One request, so that the pooled backend connection (and the fake backend's thread for
    it) exist before a test counts threads; waits until the proxy's worker thread has ended."""
    before = threading.active_count()
    test.assertEqual(request(server, "GET", "/warm-up")[0].status, 200)
    test.assertTrue(wait_until(lambda: threading.active_count() <= before + 1))


def tls_client_hello() -> bytes:
    """The bytes of a real ClientHello for the test CA (to send truncated)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# ==================================================================================================
# 1. Slow and idle clients
# ==================================================================================================

class SlowAndIdleClientTests(unittest.TestCase):
    CLIENT_TIMEOUT = 1.0

    def setUp(self):
        self.upstream = start_upstream(self)
        self.proxy = start_quiet_proxy(self, self.upstream.port, client_timeout=self.CLIENT_TIMEOUT)
        warm_up(self, self.proxy)

    def test_silent_and_half_request_clients_are_dropped_and_others_served(self):
        """Fails if a silent client blocks the accept loop or other clients, if a connection
        outlives clientTimeout (handshake or request head), or if its worker thread leaks."""
        baseline_threads = threading.active_count()
        hostile = []                                   # (socket, went silent at)
        for _ in range(50):
            sock = tls_socket(self.proxy, timeout=10)
            sock.sendall(b"GET /v1/models HT")
            hostile.append((sock, time.monotonic()))
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", self.proxy.server_address[1]), timeout=10)
            hostile.append((sock, time.monotonic()))
        self.addCleanup(lambda: [sock.close() for sock, _ in hostile])
        self.assertTrue(wait_until(lambda: threading.active_count() >= baseline_threads + 150, 2),
                        "the proxy did not take all 150 connections at once")

        started = time.monotonic()
        response, _ = request(self.proxy, "GET", "/v1/models", timeout=5)
        took = time.monotonic() - started
        self.assertEqual(response.status, 200)
        self.assertLess(took, self.CLIENT_TIMEOUT * 0.8,
                        "a normal client waited %.2fs behind 150 hostile connections" % took)

        lifetimes = self._wait_until_all_closed(hostile, deadline=self.CLIENT_TIMEOUT + 4.0)
        still_open = [i for i, life in enumerate(lifetimes) if life is None]
        self.assertEqual(still_open, [], "connections never dropped by the proxy")
        self.assertGreaterEqual(min(lifetimes), self.CLIENT_TIMEOUT * 0.9,
                                "dropped before clientTimeout")
        self.assertLess(max(lifetimes), self.CLIENT_TIMEOUT + 2.5,
                        "dropped long after clientTimeout")
        self.assertTrue(wait_until(lambda: threading.active_count() <= baseline_threads, 5),
                        "threads: %d now, %d before" % (threading.active_count(), baseline_threads))
        self.assertEqual([r.path for r in self.upstream.requests], ["/warm-up", "/v1/models"])

    def test_trickled_request_head_is_dropped_after_client_timeout(self):
        """Slowloris: one header byte every 0.3 s keeps each per-read timeout happy. Fails while
        clientTimeout bounds each recv() rather than the whole request head: the connection and
        its thread then live as long as the client keeps trickling."""
        sock = tls_socket(self.proxy, timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        sock.settimeout(0.3)            # the pause between two trickled bytes
        started = time.monotonic()
        closed_after = None
        while closed_after is None and time.monotonic() - started < self.CLIENT_TIMEOUT + 3.0:
            try:
                data = sock.recv(65536)
                if not data or data.startswith(b"HTTP/1.1 4"):
                    closed_after = time.monotonic() - started
                    break
            except socket.timeout:
                pass                    # nothing from the proxy: it is still waiting for us
            except (ConnectionError, ssl.SSLError):
                closed_after = time.monotonic() - started
                break
            try:
                sock.sendall(b"a")
            except OSError:
                closed_after = time.monotonic() - started
        self.assertIsNotNone(closed_after, "a trickling client kept its connection for %.1fs"
                             % (time.monotonic() - started))
        self.assertLess(closed_after, self.CLIENT_TIMEOUT + 1.5)

    def _wait_until_all_closed(self, sockets, deadline):
        """Seconds each socket lived after going silent until the proxy closed it (None: open)."""
        lifetimes = [None] * len(sockets)
        selector = selectors.DefaultSelector()
        self.addCleanup(selector.close)
        for index, (sock, _) in enumerate(sockets):
            # Non-blocking: a readable TLS socket may hold only a session ticket, no data.
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        end = time.monotonic() + deadline
        pending = len(sockets)
        while pending and time.monotonic() < end:
            for key, _ in selector.select(timeout=0.1):
                index = key.data
                sock, silent_since = sockets[index]
                try:
                    data = sock.recv(4096)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except (ConnectionError, ssl.SSLError):
                    data = b""
                if data:
                    continue            # an error answer: wait for the close that follows
                lifetimes[index] = time.monotonic() - silent_since
                selector.unregister(sock)
                pending -= 1
        return lifetimes


# ==================================================================================================
# 2. Garbage
# ==================================================================================================

class GarbageTests(unittest.TestCase):
    @soak
    def test_ten_thousand_garbage_connections_leak_nothing(self):
        """Random bytes, truncated ClientHellos, and full TLS handshakes followed by garbage
        (raw bytes under TLS, or random bytes inside it): fails on any exception escaping a
        worker, on a leaked thread or file descriptor, if garbage reaches the backend or the
        stats, or if the proxy stops answering afterwards."""
        needs_proc(self)
        upstream = start_upstream(self)
        server = start_quiet_proxy(self, upstream.port, client_timeout=2.0)
        warm_up(self, server)
        logs = LogCapture(self, logging.INFO)
        baseline_threads, baseline_fds = threading.active_count(), fd_count()
        port = server.server_address[1]
        hello = tls_client_hello()
        context = client_context()
        kinds = ("random bytes", "truncated ClientHello", "TLS then raw garbage",
                 "TLS then garbage inside")
        tally = {kind: 0 for kind in kinds}
        failures = []
        tally_lock = threading.Lock()
        workers = 8

        def work(worker):
            rng = random.Random(8000 + worker)
            for index in range(worker, GARBAGE_CONNECTIONS, workers):
                kind = kinds[index % len(kinds)]
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=3)
                except OSError as exc:
                    with tally_lock:
                        failures.append("connect %d: %s" % (index, exc))
                    continue
                try:
                    if kind == "random bytes":
                        sock.sendall(rng.randbytes(rng.randint(1, 600)))
                    elif kind == "truncated ClientHello":
                        sock.sendall(hello[:rng.randint(1, len(hello) - 1)])
                    else:
                        sock = context.wrap_socket(sock, server_hostname="localhost")
                        garbage = rng.randbytes(rng.randint(1, 600))
                        if kind == "TLS then raw garbage":
                            os.write(sock.fileno(), garbage)     # not a TLS record
                        else:
                            sock.sendall(garbage)
                except (OSError, ValueError):
                    pass                    # the proxy may reset us first: that is its right
                finally:
                    if rng.random() < 0.5:
                        abort(sock)
                    else:
                        sock.close()
                with tally_lock:
                    tally[kind] += 1

        started = time.monotonic()
        threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        sent_in = time.monotonic() - started
        self.assertEqual(failures[:5], [])
        self.assertEqual(sum(tally.values()), GARBAGE_CONNECTIONS, tally)

        self.assertTrue(wait_until(lambda: threading.active_count() <= baseline_threads, 10),
                        "threads: %d now, %d before" % (threading.active_count(), baseline_threads))
        self.assertTrue(wait_until(lambda: fd_count() <= baseline_fds + 2, 10),
                        "file descriptors: %d now, %d before" % (fd_count(), baseline_fds))
        self.assertEqual(logs.unexpected()[:3], [])
        response, data = request(server, "GET", "/after")
        self.assertEqual(response.status, 200)
        self.assertEqual([r.path for r in upstream.requests], ["/warm-up", "/after"])
        self.assertTrue(wait_until(lambda: server.stats.snapshot()["requests"] == 2),
                        server.stats.snapshot()["requests"])
        # For the report: how long the garbage took to send on this machine.
        if os.environ.get("HOSTILE_REPORT"):
            print("\ngarbage: %d connections in %.1fs %s" % (GARBAGE_CONNECTIONS, sent_in, tally),
                  file=sys.stderr)


# ==================================================================================================
# 3. Malformed and ambiguous HTTP
# ==================================================================================================

# A valid request appended after each malformed one: if the proxy ever resynchronised on it,
# the backend would receive it (classic request smuggling).
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"

POST_CL = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: "
POST_CHUNKED = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"

# (what, bytes sent, statuses that are a correct refusal)
MALFORMED_REQUESTS = [
    ("header block over 64 KiB in lines under the line limit",
     b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 9000)
                                                 for i in range(8)) + b"\r\n", {431}),
    ("Transfer-Encoding before Content-Length",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
     b"0\r\n\r\n", {400}),
    ("Content-Length: 0 beside chunked",
     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n", {400}),
    ("differing Content-Length values in one header",
     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!", {400}),
    ("Content-Length 5 and 05",
     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 05\r\n\r\nhello", {400}),
    ("Content-Length with a plus sign", POST_CL + b"+5\r\n\r\nhello", {400}),
    ("negative Content-Length", POST_CL + b"-5\r\n\r\nhello", {400}),
    ("hexadecimal Content-Length", POST_CL + b"0x5\r\n\r\nhello", {400}),
    ("Content-Length with inner space", POST_CL + b"5 5\r\n\r\nhello", {400}),
    ("empty Content-Length", POST_CL + b"\r\n\r\nhello", {400}),
    ("Content-Length of 20 digits", POST_CL + b"18446744073709551621\r\n\r\nhello", {400}),
    ("negative chunk size", POST_CHUNKED + b"-1\r\nx\r\n0\r\n\r\n", {400}),
    ("chunk size 0x10", POST_CHUNKED + b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", {400}),
    ("chunk size of 17 hex digits (overflows 64 bits)",
     POST_CHUNKED + b"1" + b"0" * 16 + b"\r\nab\r\n0\r\n\r\n", {400}),
    ("chunk size after a space", POST_CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", {400}),
    ("chunk size with an inner space",
     POST_CHUNKED + b"1 0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", {400}),
    ("empty chunk size line", POST_CHUNKED + b"\r\n0\r\n\r\n", {400}),
    ("chunk longer than its size", POST_CHUNKED + b"3\r\nhello\r\n0\r\n\r\n", {400}),
    ("chunk size line ending in a bare LF", POST_CHUNKED + b"5\nhello\r\n0\r\n\r\n", {400}),
    ("request line ending in a bare LF", b"GET / HTTP/1.1\nHost: x\r\n\r\n", {400}),
    ("header line ending in a bare LF", b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", {400}),
    ("head ending in a bare LF", b"GET / HTTP/1.1\r\nHost: x\r\n\n", {400}),
    ("bare CR in a header value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", {400}),
    ("bare CR ending a header line", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\r\n\r\n", {400}),
    ("bare CR between request line and headers", b"GET / HTTP/1.1\rHost: x\r\n\r\n", {400, 505}),
    ("bare CR in the target", b"GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("NUL in a header value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", {400}),
    ("NUL in a header name", b"GET / HTTP/1.1\r\nHost: x\r\nX-\x00A: b\r\n\r\n", {400}),
    ("NUL in the target", b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("space before the colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", {400}),
    ("space before the colon of Transfer-Encoding",
     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding : chunked\r\n\r\n"
     b"0\r\n\r\n", {400}),
    ("Transfer-Encoding folded onto a second line",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", {400}),
    ("Transfer-Encoding: chunked, identity",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
     {400, 501}),
    ("Transfer-Encoding: xchunked",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", {400, 501}),
    ("Transfer-Encoding: identity",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\nhello", {400, 501}),
    ("Transfer-Encoding chunked twice",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400, 501}),
    ("Transfer-Encoding with a vertical tab",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", {400, 501}),
    ("Transfer-Encoding in HTTP/1.0",
     b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}),
    ("absolute-form URI naming the backend itself", None, {400}),
    ("authority-form target", b"GET localhost:443 HTTP/1.1\r\nHost: localhost\r\n\r\n", {400}),
    ("lower-case connect method",
     b"connect localhost:443 HTTP/1.1\r\nHost: localhost\r\n\r\n", {400, 405}),
    ("asterisk-form with GET", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 505}),
    ("two spaces in the request line", b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
]


class MalformedRequestTests(unittest.TestCase):
    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port)

    def test_malformed_and_ambiguous_requests_are_refused_and_the_connection_closed(self):
        """Each head is refused with the right status and `Connection: close`, the proxy closes
        the connection, and the valid request sent right behind it never reaches the backend.
        Fails if the parser accepts any of them (the backend would record a request) or keeps
        reading after a refusal (the smuggled GET would arrive)."""
        for what, data, statuses in MALFORMED_REQUESTS:
            if data is None:
                data = (b"POST http://127.0.0.1:%d/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: 2\r\n\r\n{}" % self.backend.port)
            with self.subTest(what):
                reply, closed = raw_exchange(self.proxy, data + SMUGGLED, timeout=5)
                self.assertIn(status_of(reply), statuses, reply[:120])
                head = reply.partition(b"\r\n\r\n")[0]
                self.assertIn(b"\r\nConnection: close", head)
                self.assertEqual(heads_and_statuses(reply), [status_of(reply)],
                                 "more than one response: the proxy read on after refusing")
                self.assertTrue(closed, "the proxy kept the connection open")
        self.assertEqual(self.backend.paths(), [])
        self.assertTrue(wait_until(lambda: self.backend.connections == len(self.backend.ended)))

    def test_non_ascii_digits_in_content_length_get_400(self):
        """'²' (0xB2 as Latin-1) passes str.isdigit() but not int(): the handler thread dies with
        a ValueError traceback and the client gets no answer at all instead of a 400."""
        logs = LogCapture(self)
        for value in (b"\xb2", b"1\xb3", b"\xb9\xb9"):
            reply, closed = raw_exchange(self.proxy, POST_CL + value + b"\r\n\r\nab" + SMUGGLED)
            self.assertEqual(status_of(reply), 400, (value, reply[:80]))
            self.assertTrue(closed)
        self.assertEqual(logs.unexpected(), [])
        self.assertEqual(self.backend.paths(), [])

    def test_missing_or_repeated_host_gets_400(self):
        """RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host or with
        more than one. Two Host headers also make the reset endpoint's same-origin check and
        X-Forwarded-Host pick one of two values the client sent."""
        for data in (b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n",
                     b"GET /v1/models HTTP/1.1\r\nHost: a.example\r\nHost: localhost\r\n"
                     b"Connection: close\r\n\r\n"):
            reply, closed = raw_exchange(self.proxy, data)
            self.assertEqual(status_of(reply), 400, (data, reply[:80]))
            self.assertTrue(closed)
        self.assertEqual(self.backend.paths(), [])
        reply, _ = raw_exchange(self.proxy, b"GET /v1/models HTTP/1.0\r\n\r\n")
        self.assertEqual(status_of(reply), 200, "HTTP/1.0 needs no Host")


class ParserFuzzTests(unittest.TestCase):
    """Mutated requests straight into the parser functions (no sockets, so many cases)."""

    CASES = int(os.environ.get("HOSTILE_FUZZ_CASES", "20000"))
    SEEDS = [
        b"GET /v1/models?x=1 HTTP/1.1\r\nHost: localhost:8443\r\nAccept: */*\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 11\r\n\r\n{\"a\": true}",
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"OPTIONS * HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    ]
    TOKENS = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\x00", b",", b";", b"\x7f", b"\xff",
              b"chunked", b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
              b"Content-Length: ", b"0", b"9" * 20, b"f" * 17, b"-", b"+", b"0x", b"\r\n\r\n",
              b" HTTP/1.1", b"HTTP/2.0", b"\r\n ", b"Host: y\r\n"]
    def mutate(self, rng, data):
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            choice = rng.random()
            where = rng.randint(0, len(data))
            if choice < 0.3 and data:
                data[min(where, len(data) - 1)] = rng.randrange(256)
            elif choice < 0.7:
                data[where:where] = rng.choice(self.TOKENS)
            elif choice < 0.85:
                del data[where:where + rng.randint(1, 8)]
            else:
                lines = bytes(data).split(b"\r\n")
                line = rng.choice(lines)
                data[where:where] = line + b"\r\n"
        return bytes(data)

    def test_mutated_requests_only_ever_raise_request_error_or_client_gone(self):
        """Fails on any other exception escaping the parser (it would kill the connection's
        thread without an answer, like the ValueError of patch 02), or on a parsed head whose
        fields could inject a line into the request sent upstream."""
        rng = random.Random(int(os.environ.get("HOSTILE_SEED", "20261126")))
        accepted = refused = 0
        crashes = []
        for case in range(self.CASES):
            data = self.mutate(rng, rng.choice(self.SEEDS))
            rfile = io.BufferedReader(io.BytesIO(data))
            try:
                head = proxy.read_request_head(rfile)
                if head is None:
                    continue
                self.check_head(head)
                length = proxy.request_body_length(head)
                if length is not None:
                    pieces = proxy.iter_chunked_body(rfile) if length < 0 else \
                        proxy.iter_fixed_body(rfile, min(length, 1 << 20))
                    for _ in pieces:
                        pass
                accepted += 1
            except (proxy.RequestError, proxy.ClientGone):
                refused += 1
            except AssertionError as exc:
                crashes.append((data, "unsafe head: %s" % exc))
            except Exception as exc:            # noqa: B902 - any other escape is the bug
                crashes.append((data, repr(exc)))
        self.assertEqual(crashes[:3], [])
        self.assertGreater(accepted, self.CASES // 50)      # the mutations are not all fatal
        self.assertGreater(refused, self.CASES // 2)

    def check_head(self, head):
        """Raise AssertionError when an accepted head is unsafe to forward.

        unittest's assertions, not bare `assert`: those vanish under `python -O`, and this
        check would then pass every head.
        """
        token = r"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z"
        self.assertRegex(head.method, token)
        self.assertRegex(head.target, r"\A[\x21-\x7e]+\Z")
        self.assertIn(head.version, ("HTTP/1.0", "HTTP/1.1"))
        for name, value in head.headers:
            self.assertRegex(name, token)
            self.assertNotRegex(value, r"[\x00-\x08\x0a-\x1f\x7f]")
            self.assertEqual(value, value.strip(" \t"))


class SmugglingTests(unittest.TestCase):
    """What happens to bytes a client sends beyond the body it declared.

    The proxy reads exactly the declared body, forwards that request, answers it, and then parses
    whatever follows as the client's NEXT request, with the same strict parser. So a "smuggled"
    request reaches the backend only if it is itself a valid request, only as a separate request
    rebuilt by the proxy (its own Host, X-Forwarded-For, framing), never as bytes inside the
    first request's body; an invalid one is refused with 400 and the connection closed.
    """

    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port)

    def backend_stream(self):
        """Every byte the backend received, on its one connection."""
        self.assertTrue(wait_until(lambda: len(self.backend.raw) == 1 and self.backend.requests))
        with self.backend.lock:
            return bytes(self.backend.raw[0])

    def test_bytes_after_a_content_length_body_become_a_separate_request(self):
        smuggled = b"GET /admin HTTP/1.1\r\nHost: internal\r\nConnection: close\r\n\r\n"
        reply, closed = raw_exchange(self.proxy, b"POST /v1/a HTTP/1.1\r\nHost: localhost\r\n"
                                     b"Content-Length: 5\r\n\r\nhello" + smuggled)
        self.assertTrue(closed, "the second request's Connection: close was not honoured")
        self.assertEqual(heads_and_statuses(reply), [200, 200])
        self.assertEqual(self.backend.paths(), ["/v1/a", "/admin"])
        (first_head, first_body), (second_head, second_body) = self.backend.requests
        self.assertEqual(first_body, b"hello")
        self.assertIn(b"\r\nContent-Length: 5\r\n", first_head)
        self.assertNotIn(b"/admin", first_head + first_body)
        # The second request was parsed and rebuilt by the proxy, not passed through raw.
        self.assertIn(b"\r\nHost: 127.0.0.1:%d\r\n" % self.backend.port, second_head)
        self.assertIn(b"\r\nX-Forwarded-For: 127.0.0.1\r\n", second_head)
        self.assertIn(b"\r\nX-Forwarded-Host: internal\r\n", second_head)
        self.assertEqual(second_body, b"")
        # The byte stream on the backend connection is exactly these two requests, back to back.
        self.assertEqual(self.backend_stream(), first_head + first_body + second_head)

    def test_bytes_after_a_chunked_body_become_a_separate_request(self):
        reply, _ = raw_exchange(self.proxy, b"POST /v1/a HTTP/1.1\r\nHost: localhost\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                                b"GET /admin HTTP/1.1\r\nHost: internal\r\n"
                                b"Connection: close\r\n\r\n")
        self.assertEqual(heads_and_statuses(reply), [200, 200])
        self.assertEqual(self.backend.paths(), ["/v1/a", "/admin"])
        (first_head, first_body), (second_head, _) = self.backend.requests
        self.assertEqual(first_body, b"hello")
        self.assertNotIn(b"/admin", first_body)
        self.assertIn(b"\r\nX-Forwarded-For: 127.0.0.1\r\n", second_head)

    def test_an_invalid_smuggled_request_never_reaches_the_backend(self):
        reply, closed = raw_exchange(self.proxy, b"POST /v1/a HTTP/1.1\r\nHost: localhost\r\n"
                                     b"Content-Length: 5\r\n\r\nhello"
                                     b"GET /admin HTTP/1.1\nHost: internal\n\n")
        self.assertEqual(heads_and_statuses(reply), [200, 400])
        self.assertTrue(closed)
        self.assertEqual(self.backend.paths(), ["/v1/a"])
        self.assertEqual(self.backend.requests[0][1], b"hello")
        self.assertNotIn(b"/admin", self.backend_stream())

    def test_a_body_shorter_than_declared_is_never_completed_by_the_next_request(self):
        """Content-Length: 50 but 5 bytes and then a request: those bytes ARE the body (the client
        said so); the proxy must wait for all 50, forward them as one body, and nothing else."""
        tail = b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n"
        body = b"hello" + tail + b"x" * (45 - len(tail))
        reply, _ = raw_exchange(self.proxy, b"POST /v1/a HTTP/1.1\r\nHost: localhost\r\n"
                                b"Content-Length: 50\r\nConnection: close\r\n\r\n" + body)
        self.assertEqual(heads_and_statuses(reply), [200])
        self.assertEqual(self.backend.paths(), ["/v1/a"])
        self.assertEqual(self.backend.requests[0][1], body)


# ==================================================================================================
# 4. Backend faults
# ==================================================================================================

RESPONSE_HEAD_100 = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n")


def reset_before_headers(backend, sock, request, n):
    abort(sock)
    return False


def reset_mid_body(backend, sock, request, n):
    sock.sendall(RESPONSE_HEAD_100 + b"[" * 10)
    backend.go.wait(5)              # the client has seen the head and the first bytes
    abort(sock)
    return False


def stall_before_headers(backend, sock, request, n):
    backend.release.wait(10)
    return False


def stall_mid_body(backend, sock, request, n):
    sock.sendall(RESPONSE_HEAD_100 + b"[" * 10)
    backend.release.wait(10)
    return False


def garbage_instead_of_http(backend, sock, request, n):
    sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff garbage\r\n\r\n")
    return False


def answer_then_close(backend, sock, request, n):
    answer_ok(backend, sock, request, n)
    return False                    # close the keep-alive connection right after answering


def close_second_request_unanswered(backend, sock, request, n):
    """Answers the first request of a connection; closes on the second without answering,
    as a backend does whose idle timeout fires just as the proxy reuses the connection."""
    if n >= 2:
        return False
    return answer_ok(backend, sock, request, n)


class BackendFaultTests(unittest.TestCase):
    READ_TIMEOUT = 0.5

    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port, read_timeout=self.READ_TIMEOUT)
        self.logs = LogCapture(self)
        self.client = https(self.proxy, timeout=10)
        self.addCleanup(self.client.close)

    def get(self, conn=None, method="GET", path="/v1/models", body=None):
        conn = conn or self.client
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response, response.read()

    def assert_counted_and_recovers(self, errors_before, expected_errors=1, conn=None):
        expected = errors_before + expected_errors
        self.assertTrue(wait_until(lambda: errors(self.proxy) == expected),
                        "errors: %d, expected %d" % (errors(self.proxy), expected))
        self.backend.behaviour = answer_ok
        response, data = self.get(conn)
        self.assertEqual(response.status, 200, data)
        self.assertEqual(errors(self.proxy), expected)
        self.assertEqual(self.logs.unexpected(), [])

    def test_refused_then_the_backend_comes_back(self):
        holder = socket.socket()                     # bound, not listening: connect is refused
        holder.bind(("127.0.0.1", 0))
        server = start_quiet_proxy(self, holder.getsockname()[1])
        conn = https(server)
        self.addCleanup(conn.close)
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        self.assertEqual(response.status, 502)
        self.assertIn(b"connection refused", response.read())
        self.assertTrue(wait_until(lambda: errors(server) == 1))
        ScriptedBackend(self, listener=holder)       # the backend starts listening on that port
        conn.request("GET", "/v1/models")            # same client connection: it was kept
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (200, b'{"ok":true,"n":1}'))
        self.assertEqual(errors(server), 1)

    def test_reset_before_headers_gives_502(self):
        before = errors(self.proxy)
        self.backend.behaviour = reset_before_headers
        response, data = self.get()
        self.assertEqual(response.status, 502, data)
        self.assertIn(b"closed the connection without answering", data)
        self.assert_counted_and_recovers(before)

    def test_reset_mid_body_aborts_the_client_connection(self):
        before = errors(self.proxy)
        self.backend.behaviour = reset_mid_body
        self.client.request("GET", "/v1/models")
        response = self.client.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.read(10), b"[" * 10)
        self.backend.go.set()
        with self.assertRaises((http.client.IncompleteRead, ConnectionError, ssl.SSLError)):
            response.read()
        self.client.close()
        self.assert_counted_and_recovers(before)

    def test_stall_before_headers_gives_504(self):
        before = errors(self.proxy)
        self.backend.behaviour = stall_before_headers
        started = time.monotonic()
        response, data = self.get()
        self.assertEqual(response.status, 504, data)
        self.assertLess(time.monotonic() - started, self.READ_TIMEOUT + 2)
        self.assert_counted_and_recovers(before)

    def test_stall_mid_body_aborts_the_client_connection(self):
        before = errors(self.proxy)
        self.backend.behaviour = stall_mid_body
        self.client.request("GET", "/v1/models")
        response = self.client.getresponse()
        self.assertEqual(response.status, 200)
        started = time.monotonic()
        with self.assertRaises((http.client.IncompleteRead, ConnectionError, ssl.SSLError)):
            response.read()
        self.assertLess(time.monotonic() - started, self.READ_TIMEOUT + 2)
        self.client.close()
        self.assert_counted_and_recovers(before)

    def test_garbage_instead_of_http_gives_502(self):
        before = errors(self.proxy)
        self.backend.behaviour = garbage_instead_of_http
        response, data = self.get()
        self.assertEqual(response.status, 502, data)
        self.assertNotIn(b"SSH-2.0", data)           # the backend's bytes are not relayed
        self.assert_counted_and_recovers(before)

    def test_backend_closing_an_idle_pooled_connection_is_invisible(self):
        before = errors(self.proxy)
        self.backend.behaviour = answer_then_close
        for _ in range(3):
            # Wait until the backend has closed the pooled connection, then reuse fails over.
            ended = len(self.backend.ended)
            self.assertEqual(self.get()[0].status, 200)
            self.assertTrue(wait_until(lambda: len(self.backend.ended) > ended))
        self.assertEqual(errors(self.proxy), before)
        self.assertEqual(self.backend.connections, 3)

    def test_connection_closed_as_it_is_reused_is_retried_once(self):
        """The backend closes a keep-alive connection just as the proxy sends the next request
        on it. The proxy retries once on a new connection, so the client sees a 200 and no
        error is counted; the backend did receive that request twice (once on the dying
        connection). Only an idempotent method, or a request not yet sent, is sent again: a
        POST the backend may have read gets a 502 instead (round_trip; see test_proxy's
        test_a_post_the_backend_may_have_read_is_never_sent_twice)."""
        self.backend.behaviour = close_second_request_unanswered
        before = errors(self.proxy)
        self.assertEqual(self.get(path="/first")[0].status, 200)
        response, data = self.get(path="/v1/models")
        self.assertEqual(response.status, 200, data)
        self.assertEqual(self.backend.paths(), ["/first", "/v1/models", "/v1/models"])
        self.assertEqual(self.backend.connections, 2)
        self.assertEqual(errors(self.proxy), before)

    def test_streamed_upload_on_a_connection_closed_as_it_is_reused_gives_502(self):
        """A body over the buffering limit is streamed, so it cannot be sent again: 502."""
        self.backend.behaviour = close_second_request_unanswered
        before = errors(self.proxy)
        self.assertEqual(self.get(path="/first")[0].status, 200)
        body = b"x" * (proxy.BODY_BUFFER_LIMIT + 1)
        response, data = self.get(method="POST", path="/v1/upload", body=body)
        self.assertEqual(response.status, 502, data)
        fresh = https(self.proxy)          # the client connection was closed after the 502
        self.addCleanup(fresh.close)
        self.assert_counted_and_recovers(before, conn=fresh)


# ==================================================================================================
# 5. Client faults
# ==================================================================================================

def stream_until_the_proxy_hangs_up(backend, sock, request, n):
    """An SSE stream, one event every 20 ms, until the proxy closes the connection; records
    when that was noticed in backend.noticed_at."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    sock.settimeout(0.02)
    for i in range(1000):
        event = b"data: %d\n\n" % i
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            if sock.recv(1) == b"":
                break
        except socket.timeout:
            continue
        except OSError:
            break
    backend.noticed_at = time.monotonic()
    backend.go.set()
    return False


class ClientFaultTests(unittest.TestCase):
    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port, client_timeout=2.0)
        warm_up(self, self.proxy)
        self.baseline_threads = threading.active_count()

    def test_disconnect_mid_upload_never_completes_the_request_upstream(self):
        """Fails if the proxy forwards a cut-short body as if it were complete (sending the
        buffered part with a smaller Content-Length, or ending a streamed body with the last
        chunk), if it leaves the backend connection open, or if the fault is not counted."""
        big = proxy.BODY_BUFFER_LIMIT * 3
        cases = [
            # (what, head, body bytes sent before leaving, streamed to the backend?, reset?)
            ("small body, FIN", b"Content-Length: 1000", b"a" * 500, False, False),
            ("small body, RST", b"Content-Length: 1000", b"a" * 500, False, True),
            ("large body, FIN", b"Content-Length: %d" % big, b"b" * (big // 2), True, False),
            ("large body, RST", b"Content-Length: %d" % big, b"b" * (big // 2), True, True),
            ("chunked, cut inside a chunk", b"Transfer-Encoding: chunked",
             b"1000\r\n" + b"c" * 4096 + b"\r\n1000\r\n" + b"c" * 100, True, False),
            ("chunked, cut before the last chunk", b"Transfer-Encoding: chunked",
             b"5\r\nhello\r\n", True, False),
            ("chunked, cut inside the last chunk", b"Transfer-Encoding: chunked",
             b"5\r\nhello\r\n0\r\n", True, False),
        ]
        for index, (what, framing, sent, streamed, reset) in enumerate(cases):
            with self.subTest(what):
                partial_before, errors_before = self.backend.partial, errors(self.proxy)
                sock = tls_socket(self.proxy)
                sock.sendall(b"POST /v1/upload-%d HTTP/1.1\r\nHost: localhost\r\n%s\r\n\r\n%s"
                             % (index, framing, sent))
                if streamed:            # wait until the proxy has begun sending it upstream
                    self.assertTrue(wait_until(lambda: b"/v1/upload-%d " % index in b"".join(
                        bytes(r) for r in self.backend.raw), 3))
                else:
                    time.sleep(0.05)    # give a wrong proxy the time to forward something
                left_at = time.monotonic()
                abort(sock) if reset else sock.close()
                self.assertTrue(wait_until(
                    lambda: threading.active_count() <= self.baseline_threads, 3))
                if streamed:
                    self.assertTrue(wait_until(lambda: errors(self.proxy) == errors_before + 1, 3),
                                    "the aborted upload was not counted as an error")
                # A small body: whether it counts depends on the Python version until patch 05
                # (see test_client_stalling_mid_upload_is_a_client_fault).
                if streamed:
                    self.assertTrue(
                        wait_until(lambda: self.backend.partial == partial_before + 1, 3),
                        "the backend never saw the partial request end")
                    self.assertLess(self.backend.ended[-1] - left_at, 1.0)
                else:
                    self.assertEqual(self.backend.partial, partial_before,
                                     "a small body is buffered: nothing should reach the backend")
                self.assertNotIn("/v1/upload-%d" % index, self.backend.paths())
        self.assertEqual(self.backend.paths(), ["/warm-up"])
        self.assertEqual(request(self.proxy, "GET", "/after")[0].status, 200)

    def test_client_stalling_mid_upload_is_a_client_fault(self):
        """A client that stops sending its body for clientTimeout. Fails while the proxy blames
        the backend (a streamed body gets "504 the backend did not answer within 10s" after
        0.5 s) or records a small body's request as status 0 and no error. (On Python 3.9 and
        3.13 a client that simply disconnects mid-upload hits the same code: its read fails
        with ECONNRESET, where 3.11 sees end of stream.)"""
        server = start_quiet_proxy(self, self.backend.port, client_timeout=0.5)
        cases = [("small body", b"Content-Length: 1000", b"a" * 500),
                 ("large body", b"Content-Length: %d" % (proxy.BODY_BUFFER_LIMIT * 2),
                  b"b" * proxy.BODY_BUFFER_LIMIT),
                 ("chunked", b"Transfer-Encoding: chunked", b"5\r\nhello\r\n")]
        for what, framing, sent in cases:
            with self.subTest(what):
                errors_before = errors(server)
                reply, closed = raw_exchange(server, b"POST /v1/upload HTTP/1.1\r\nHost: x\r\n%s"
                                             b"\r\n\r\n%s" % (framing, sent), timeout=5)
                self.assertTrue(closed)
                self.assertIn(status_of(reply), (0, 408), reply[:200])
                self.assertTrue(wait_until(lambda: errors(server) == errors_before + 1, 3))
                self.assertIn(server.stats.snapshot()["recent"][0]["status"], (408, 499))
        self.assertEqual(self.backend.paths(), ["/warm-up"])

    def test_disconnect_mid_stream_closes_the_backend_connection_within_a_second(self):
        for reset in (False, True):
            with self.subTest(reset=reset):
                self.backend.go.clear()
                self.backend.behaviour = stream_until_the_proxy_hangs_up
                errors_before = errors(self.proxy)
                sock = tls_socket(self.proxy)
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                             b"Content-Length: 15\r\n\r\n{\"stream\":true}")
                received = b""
                while b"data: 3\n" not in received:
                    piece = sock.recv(4096)
                    self.assertTrue(piece, "the stream ended early")
                    received += piece
                left_at = time.monotonic()
                abort(sock) if reset else sock.close()
                self.assertTrue(self.backend.go.wait(5), "the backend kept streaming")
                self.assertLess(self.backend.noticed_at - left_at, 1.0)
                if os.environ.get("HOSTILE_REPORT"):
                    print("\nclient left mid-stream (%s): backend noticed after %.3fs"
                          % ("RST" if reset else "FIN", self.backend.noticed_at - left_at),
                          file=sys.stderr)
                self.assertTrue(wait_until(lambda: errors(self.proxy) == errors_before + 1, 3))
                self.assertTrue(wait_until(
                    lambda: threading.active_count() <= self.baseline_threads, 3),
                    "threads: %d now, %d before"
                    % (threading.active_count(), self.baseline_threads))
        self.backend.behaviour = answer_ok
        self.assertEqual(request(self.proxy, "GET", "/after")[0].status, 200)


class BackendResponseHygieneTests(unittest.TestCase):
    """A backend's ambiguous response framing must not reach the client (RFC 9112 §6.3 and
    RFC 9110 §8.6, §5.2 of RFC 9112 for obs-fold): a client that resolves the ambiguity
    differently than the proxy did would read the next response out of this one's body."""

    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port)

    def reply_to(self, response_bytes):
        def behaviour(backend, sock, request, n):
            sock.sendall(response_bytes)
            return False
        self.backend.behaviour = behaviour
        reply, closed = raw_exchange(self.proxy, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"
                                     b"Connection: close\r\n\r\n")
        self.assertTrue(closed)
        head, _, body = reply.partition(b"\r\n\r\n")
        return head, body

    def test_content_length_beside_chunked_is_dropped(self):
        head, body = self.reply_to(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertEqual(body, b"5\r\nhello\r\n0\r\n\r\n")
        self.assertNotIn(b"content-length", head.lower(),
                         "Content-Length and Transfer-Encoding both sent to the client")

    def test_unparsable_content_length_gives_502(self):
        # RFC 9112 §6.3: an invalid Content-Length makes the framing unknowable; a proxy MUST
        # answer 502 (issue 11 item 3; this once re-framed the body read until the close).
        head, body = self.reply_to(b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello")
        self.assertTrue(head.startswith(b"HTTP/1.1 502"), head)
        self.assertNotIn(b"hello", body)

    def test_conflicting_content_lengths_give_502(self):
        head, body = self.reply_to(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                                   b"Content-Length: 7\r\n\r\nhello12")
        self.assertTrue(head.startswith(b"HTTP/1.1 502"), head + body)

    def test_folded_header_lines_are_unfolded(self):
        head, body = self.reply_to(b"HTTP/1.1 200 OK\r\nX-Note: a\r\n b\r\nContent-Length: 5\r\n"
                                   b"\r\nhello")
        self.assertEqual(body, b"hello")
        self.assertNotRegex(head, rb"\r\n[ \t]", "obs-fold passed on to the client")
        self.assertIn(b"\r\nX-Note: a b", head)

    def test_identical_repeated_content_length_and_a_clean_response_pass(self):
        head, body = self.reply_to(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                                   b"Content-Length: 5\r\n\r\nhello")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertEqual(body, b"hello")


# ==================================================================================================
# 6. Stats durability: the proxy as a subprocess, killed
# ==================================================================================================

def _accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _main_thread_sleeps_on_a_lock(pid: int) -> bool:
    """True when the main thread of `pid` sleeps on a futex (a lock or condition wait), read
    from /proc/PID/task/PID (Linux). Without /proc, True: the caller then checks only that
    the process is alive."""
    if not os.path.isdir("/proc/self/task"):
        return True
    try:
        with open("/proc/%d/task/%d/stat" % (pid, pid)) as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        with open("/proc/%d/task/%d/wchan" % (pid, pid)) as handle:
            wchan = handle.read()
    except (OSError, IndexError):
        return False
    return state == "S" and "futex" in wchan


class ProxyProcess:
    """`python3 proxy.py --config <dir>/config.json --quiet` on a free loopback port.

    `prefix_code` runs in the child before proxy.py (resource limits). stderr is collected for
    failure messages."""

    def __init__(self, workdir, certs, upstream_port, stats_file, persist_interval=1.0,
                 prefix_code="", argv_prefix=()):
        self.workdir = workdir
        self.certs = certs
        self.upstream_port = upstream_port
        self.stats_file = stats_file
        self.persist_interval = persist_interval
        self.prefix_code = prefix_code
        self.argv_prefix = list(argv_prefix)
        self.proc = None
        self.port = None
        self.stderr = []

    def start(self, timeout=15.0):
        """Start and wait until the port accepts connections. Returns self."""
        for _attempt in range(3):
            with socket.socket() as probe:
                # Port 0 cannot be used: --quiet hides the banner that would name the port.
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
            config = {
                "proxy": {"port": self.port, "bind": "127.0.0.1", "clientTimeout": 5},
                "target": {"host": "127.0.0.1", "port": self.upstream_port, "readTimeout": 10},
                "tls": {"cert": os.path.join(self.certs, "cert.pem"),
                        "key": os.path.join(self.certs, "key.pem")},
                "tracking": {"statsFile": self.stats_file,
                             "persistInterval": self.persist_interval},
            }
            path = os.path.join(self.workdir, "config.json")
            with open(path, "w") as handle:
                json.dump(config, handle)
            code = self.prefix_code + "import runpy, sys\nsys.argv = sys.argv[1:]\n" \
                "runpy.run_path(sys.argv[0], run_name='__main__')\n"
            self.stderr = []
            self.proc = subprocess.Popen(
                self.argv_prefix + [sys.executable, "-c", code, PROXY_SCRIPT, "--config", path,
                                    "--quiet"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                cwd=self.workdir)
            threading.Thread(target=self._collect, args=(self.proc, self.stderr),
                             daemon=True).start()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.01)
            self.proc.wait(5)
            if "already in use" not in self.stderr_text():
                break
        raise AssertionError("proxy.py did not start listening: %s" % self.stderr_text())

    @staticmethod
    def _collect(proc, lines):
        for line in proc.stderr:
            lines.append(line.decode("utf-8", "replace"))
        proc.stderr.close()

    def stderr_text(self):
        return "".join(self.stderr)[-3000:]

    def client(self, timeout=10.0):
        return http.client.HTTPSConnection("localhost", self.port, context=client_context(),
                                           timeout=timeout)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout=15.0):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop_quietly(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def private_certs(test) -> str:
    """A copy of the test certificates that a child process may use (and even renew)."""
    directory = tempfile.mkdtemp(prefix="llm-proxy-hostile-certs-")
    test.addCleanup(shutil.rmtree, directory, True)
    for name in os.listdir(certs_dir()):
        shutil.copy2(os.path.join(certs_dir(), name), directory)
    return directory


def read_stats_file(path):
    """(parsed document, error text): the document is None when the file is absent."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None, None
    try:
        return json.loads(data.decode("utf-8")), None
    except ValueError as exc:
        return None, "stats.json is not valid JSON (%s): %r" % (exc, data[:200])


class StatsDurabilityTests(unittest.TestCase):
    PERSIST_INTERVAL = 1.0
    # Time a save may take (fsync on a slow disk), and a request may wait to be recorded after
    # its answer went out.
    SLACK = 0.5

    def setUp(self):
        self.upstream = start_upstream(self)
        self.certs = private_certs(self)

    def workdir(self):
        directory = tempfile.mkdtemp(prefix="llm-proxy-hostile-")
        self.addCleanup(shutil.rmtree, directory, True)
        return directory

    def launch(self, directory, stats_file=None, **options):
        process = ProxyProcess(directory, self.certs, self.upstream.port,
                               stats_file or os.path.join(directory, "stats.json"), **options)
        self.addCleanup(process.stop_quietly)
        return process.start()

    @soak
    def test_kill_9_at_random_moments_never_corrupts_or_loses_more_than_one_interval(self):
        """30 runs (3 lanes of 10 in parallel, each lane one cumulative stats file): start, send
        requests for one persist interval, go on for a random 0-1.5 s more, kill -9. Fails if
        stats.json is ever torn or invalid, if it was set aside as corrupt, if the next start
        did not load it (the count would go down), or if a request answered more than one
        persist interval (+0.5 s for the save itself) before the kill is missing from it."""
        lanes = min(3, KILL_RUNS)
        results = [[] for _ in range(lanes)]
        rng = random.Random(int(os.environ.get("HOSTILE_SEED", "20261126")))
        delays = [rng.uniform(0, 1.5) for _ in range(KILL_RUNS)]
        threads = [threading.Thread(target=self._kill_lane,
                                    args=(self.workdir(), delays[lane::lanes], results[lane]),
                                    daemon=True)
                   for lane in range(lanes)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(240)
        took = time.monotonic() - started
        runs = [run for lane in results for run in lane]
        self.assertEqual(len(runs), KILL_RUNS, [r.get("error") for r in runs])
        worst_age = 0.0
        saves_seen = 0
        checked = 0
        for run in runs:
            with self.subTest(lane=run["lane"], run=run["index"], delay=round(run["delay"], 2)):
                self.assertIsNone(run.get("error"), run.get("stderr"))
                self.assertIsNone(run["invalid"])
                self.assertEqual(run["corrupt_files"], [])
                self.assertGreaterEqual(run["delta"], 0, "the next start did not load stats.json")
                self.assertGreaterEqual(run["delta"], run["completed_early"],
                                        "lost requests answered more than %.1fs before the kill"
                                        % (self.PERSIST_INTERVAL + self.SLACK))
                self.assertLessEqual(run["delta"], run["completed"] + 1)
                saves_seen += run["delta"] > 0
                checked += run["completed_early"] > 0
                worst_age = max(worst_age, run["oldest_lost_age"])
        # Not vacuous: most runs had answers old enough that they must have been saved.
        self.assertGreaterEqual(checked, KILL_RUNS // 3)
        if os.environ.get("HOSTILE_REPORT"):
            print("\nkill -9: %d runs in %.1fs, %d requests answered, %d persisted, runs with a "
                  "save: %d, runs with answers that had to be saved: %d, oldest lost answer "
                  "%.2fs before its kill, stray temp files %d"
                  % (len(runs), took, sum(r["completed"] for r in runs),
                     sum(r["delta"] for r in runs), saves_seen, checked, worst_age,
                     sum(r["temp_files"] for r in runs[-lanes:])), file=sys.stderr)

    def _kill_lane(self, directory, delays, results):
        """One lane: its runs one after another on one stats file. Records, never asserts."""
        stats_file = os.path.join(directory, "stats.json")
        persisted = 0
        for index, delay in enumerate(delays):
            run = {"lane": directory[-6:], "index": index, "delay": delay}
            results.append(run)
            try:
                process = ProxyProcess(directory, self.certs, self.upstream.port, stats_file,
                                       self.PERSIST_INTERVAL)
                process.start()
            except AssertionError as exc:
                run["error"] = str(exc)
                return
            try:
                completions = []
                stop = threading.Event()
                client = threading.Thread(target=self._busy_client,
                                          args=(process, completions, stop), daemon=True)
                client.start()
                time.sleep(self.PERSIST_INTERVAL + delay)
                killed_at = time.monotonic()
                process.kill9()
                stop.set()
                client.join(10)
            finally:
                process.stop_quietly()
            document, invalid = read_stats_file(stats_file)
            now_persisted = document["requests"] if document else persisted
            delta = now_persisted - persisted
            cutoff = killed_at - self.PERSIST_INTERVAL - self.SLACK
            lost = completions[max(delta, 0):]
            run.update(
                invalid=invalid, delta=delta, completed=len(completions),
                completed_early=sum(1 for t in completions if t <= cutoff),
                oldest_lost_age=killed_at - lost[0] if lost else 0.0,
                corrupt_files=[n for n in os.listdir(directory) if ".corrupt-" in n],
                temp_files=sum(1 for n in os.listdir(directory) if n.endswith(".tmp")),
                stderr=process.stderr_text())
            persisted = now_persisted

    @staticmethod
    def _busy_client(process, completions, stop):
        """Requests back to back on one keep-alive connection; records when each was answered.
        Many distinct paths make stats.json large, so a kill often lands inside a save."""
        conn = process.client()
        try:
            i = 0
            while not stop.is_set():
                i += 1
                conn.request("POST", "/v1/chat/completions/%d" % (i % 150),
                             body=b'{"model": "m%d"}' % (i % 40))
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    completions.append(time.monotonic())
                stop.wait(0.002)        # leave the CPU to the other lanes' proxies
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()

    def test_sigterm_loses_nothing(self):
        """persistInterval is an hour, so only the save at shutdown can have written the counts.
        At SIGTERM one request is in flight (it must finish and be counted) and one keep-alive
        connection is idle (it must not hold the shutdown up)."""
        release = threading.Event()
        self.addCleanup(release.set)

        def responder(handler, request):
            if request.path == "/v1/slow":
                release.wait(10)
            echo_responder(handler, request)
        self.upstream.responder = responder
        directory = self.workdir()
        process = self.launch(directory, persist_interval=3600)
        idle = process.client()
        self.addCleanup(idle.close)
        for i in range(40):
            idle.request("POST", "/v1/chat/completions", body=b'{"model": "m"}')
            response = idle.getresponse()
            response.read()
            self.assertEqual(response.status, 200)
        slow_status = []

        def slow():
            conn = process.client()
            try:
                conn.request("POST", "/v1/slow", body=b"{}")
                response = conn.getresponse()
                response.read()
                slow_status.append(response.status)
            finally:
                conn.close()
        slow_thread = threading.Thread(target=slow, daemon=True)
        slow_thread.start()
        self.assertTrue(wait_until(
            lambda: any(r.path == "/v1/slow" for r in self.upstream.requests)))
        process.proc.send_signal(signal.SIGTERM)
        # serve() closes the listener, then waits for the request in flight: once connections
        # are refused and its main thread sleeps on a lock a few looks in a row, it is waiting.
        self.assertTrue(wait_until(lambda: not _accepts(process.port), 5))
        streak = [0]

        def waiting():
            streak[0] = streak[0] + 1 if _main_thread_sleeps_on_a_lock(process.proc.pid) else 0
            return streak[0] >= 5 or process.proc.poll() is not None
        self.assertTrue(wait_until(waiting, 5, 0.02))
        self.assertIsNone(process.proc.poll(), "exited with a request in flight")
        release.set()
        released = time.monotonic()
        self.assertEqual(process.proc.wait(10), 0, process.stderr_text())
        stopped_in = time.monotonic() - released
        slow_thread.join(5)
        self.assertEqual(slow_status, [200])
        self.assertLess(stopped_in, 2.0, "an idle keep-alive connection held the shutdown up")
        document, invalid = read_stats_file(os.path.join(directory, "stats.json"))
        self.assertIsNone(invalid)
        self.assertIsNotNone(document, "nothing saved at shutdown")
        self.assertEqual(document["requests"], 41)
        # And the next start carries on from there.
        process = self.launch(directory, persist_interval=3600)
        conn = process.client()
        conn.request("GET", "/_proxy/stats")
        self.assertEqual(json.loads(conn.getresponse().read())["requests"], 41)
        conn.close()
        self.assertEqual(process.terminate(), 0)

    def _seed_stats_file(self, path, requests=7):
        store = proxy.StatsStore(path=path)
        for _ in range(requests):
            store.record(proxy.RequestRecord(time=time.time(), method="GET", path="/seed",
                                             status=200, client="127.0.0.1", duration_ms=1.0))
        self.assertTrue(store.save())
        with open(path, "rb") as handle:
            return handle.read()

    def _forwarding_survives_failed_saves(self, process, directory, seeded):
        conn = process.client()
        self.addCleanup(conn.close)
        first_failure = time.monotonic()
        count = 0
        while True:         # keep forwarding through three failed save intervals
            count += 1
            conn.request("POST", "/v1/chat/completions", body=b'{"model": "m"}')
            response = conn.getresponse()
            response.read()
            self.assertEqual(response.status, 200, process.stderr_text())
            conn.request("GET", "/_proxy/stats")
            snapshot = json.loads(conn.getresponse().read())
            if snapshot["persistence"]["lastError"] and \
                    time.monotonic() - first_failure > 3 * self.PERSIST_INTERVAL:
                break
            self.assertLess(time.monotonic() - first_failure, 15,
                            "no save error reported: %s" % snapshot["persistence"])
            time.sleep(0.05)
        self.assertEqual(snapshot["requests"], 7 + count)
        with open(os.path.join(directory, "stats.json"), "rb") as handle:
            self.assertEqual(handle.read(), seeded, "the last good stats.json was touched")
        conn.close()
        self.assertEqual(process.terminate(), 0, process.stderr_text())
        # Looked at once the process is gone (its last save at shutdown failed too): while it
        # runs, a listing can catch the autosave thread between mkstemp() and its unlink().
        self.assertEqual([n for n in os.listdir(directory) if n.endswith(".tmp")], [],
                         "a failed save left a temp file behind")
        return snapshot["persistence"]["lastError"]

    def test_full_disk_never_stops_forwarding(self):
        """A file size limit (RLIMIT_FSIZE, as for a full disk) makes every save fail with EFBIG:
        forwarding goes on, the error is reported, the last good stats.json stays intact."""
        try:
            import resource     # noqa: F401 - POSIX only
        except ImportError:
            self.skipTest("needs the resource module (POSIX)")
        directory = self.workdir()
        seeded = self._seed_stats_file(os.path.join(directory, "stats.json"))
        limit = ("import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                 "resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d))\n" % (len(seeded) // 2,
                                                                            len(seeded) // 2))
        process = self.launch(directory, prefix_code=limit,
                              persist_interval=self.PERSIST_INTERVAL)
        error = self._forwarding_survives_failed_saves(process, directory, seeded)
        self.assertIn("too large", error.lower())

    def test_read_only_directory_never_stops_forwarding(self):
        directory = self.workdir()
        seeded = self._seed_stats_file(os.path.join(directory, "stats.json"))
        os.chmod(directory, 0o555)
        self.addCleanup(os.chmod, directory, 0o755)
        argv_prefix = ()
        if os.geteuid() == 0:
            # root ignores directory permissions; drop the capabilities that let it.
            setpriv = shutil.which("setpriv")
            if not setpriv:
                self.skipTest("running as root without setpriv: cannot make a directory read-only")
            argv_prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner")
        config_dir = self.workdir()       # the config file is written outside the r/o directory
        process = ProxyProcess(config_dir, self.certs, self.upstream.port,
                               os.path.join(directory, "stats.json"), self.PERSIST_INTERVAL,
                               argv_prefix=argv_prefix)
        self.addCleanup(process.stop_quietly)
        process.start()
        error = self._forwarding_survives_failed_saves(process, directory, seeded)
        self.assertIn("permission denied", error.lower())


# ==================================================================================================
# 7. Security
# ==================================================================================================

SECRETS = ("sk-SECRET-123", "sk-ant-SECRET-456", "sk-QUERY-789")
CREDENTIALS = {"Authorization": "Bearer sk-SECRET-123", "x-api-key": "sk-ant-SECRET-456"}


def csp_directives(policy: str):
    directives = {}
    for part in policy.split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


class SecurityTests(unittest.TestCase):
    def setUp(self):
        self.backend = ScriptedBackend(self)

    def test_pages_allow_no_inline_script_but_their_own(self):
        """Fails if the CSP allows 'unsafe-inline', 'unsafe-eval', a wildcard or any other
        script source (an injected model name could then run), if a page's own script is not
        covered by a hash (the page would break), or if it can be framed (clickjacking)."""
        server = start_quiet_proxy(self, self.backend.port)
        for path in ("/_proxy/dashboard", "/_proxy/"):
            with self.subTest(path):
                response, body = request(server, "GET", path)
                self.assertEqual(response.status, 200)
                self.assertTrue(response.getheader("Content-Type").startswith("text/html"))
                self.assertEqual(response.getheader("X-Content-Type-Options"), "nosniff")
                policy = response.getheader("Content-Security-Policy")
                self.assertTrue(policy, "no Content-Security-Policy")
                directives = csp_directives(policy)
                self.assertEqual(directives.get("default-src"), ["'none'"])
                scripts = directives.get("script-src", directives["default-src"])
                hashes = set()
                for source in scripts:
                    match = re.match(r"'(sha256|sha384|sha512)-([A-Za-z0-9+/]+=*)'\Z", source)
                    self.assertTrue(source in ("'none'", "'self'") or match,
                                    "script-src allows %s" % source)
                    if match:
                        hashes.add(match.group(2))
                self.assertNotIn("script-src-attr", directives)
                self.assertNotIn("script-src-elem", directives)
                self.assertEqual(directives.get("frame-ancestors"), ["'none'"])
                self.assertIn(directives.get("base-uri"), (["'none'"], ["'self'"]))
                self.assertEqual(directives.get("object-src", directives["default-src"]),
                                 ["'none'"])
                import base64
                import hashlib
                html = body.decode("utf-8")
                for script in re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S | re.I):
                    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest())
                    self.assertIn(digest.decode(), hashes, "an inline script the CSP blocks")

    def test_json_and_text_answers_are_never_sniffed_as_html(self):
        """/_proxy/stats echoes client-chosen paths and model names; the 404 answer echoes the
        requested path. Served as application/json WITH X-Content-Type-Options: nosniff, a
        browser never renders them as HTML. Fails while the header is missing."""
        self.backend.behaviour = answer_ok
        server = start_quiet_proxy(self, self.backend.port)
        hostile = "/v1/<script>alert(1)</script>"
        request(server, "POST", hostile, body=b'{"model": "<img src=x onerror=alert(2)>"}')
        for path, content_type in (("/_proxy/stats", "application/json"),
                                   ("/_proxy/health", "application/json"),
                                   ("/_proxy/<script>alert(3)</script>", "application/json"),
                                   ("/_proxy/metrics", "text/plain")):
            with self.subTest(path):
                response, body = request(server, "GET", path)
                self.assertTrue(response.getheader("Content-Type", "").startswith(content_type),
                                response.getheader("Content-Type"))
                self.assertEqual(response.getheader("X-Content-Type-Options"), "nosniff")
        response, body = request(server, "GET", "/_proxy/stats")
        self.assertIn(b"<script>alert(1)</script>", body)   # raw in JSON: the header matters

    def test_reset_refuses_other_origins(self):
        """A page on another site can POST to the proxy (a form or fetch needs no preflight),
        but its browser always sends Origin: anything but https://<Host> is refused and the
        stats survive. GET cannot reset (an <img> tag would do it)."""
        server = start_quiet_proxy(self, self.backend.port)
        request(server, "GET", "/v1/models")
        self.assertTrue(wait_until(lambda: server.stats.snapshot()["requests"] == 1))
        own = "https://localhost:%d" % server.server_address[1]
        for origin in ("https://evil.example", "null", own + ".evil.example", own + "/",
                       "http://localhost:%d" % server.server_address[1], "https://localhost"):
            with self.subTest(origin=origin):
                response, body = request(server, "POST", "/_proxy/reset",
                                         headers={"Origin": origin, "Content-Type": "text/plain"})
                self.assertEqual(response.status, 403, body)
                self.assertEqual(server.stats.snapshot()["requests"], 1, "stats were reset")
        response, _ = request(server, "GET", "/_proxy/reset")
        self.assertEqual(response.status, 405)
        response, _ = request(server, "OPTIONS", "/_proxy/reset", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        self.assertNotEqual(response.status // 100, 2, "a cross-site preflight for reset passed")
        self.assertEqual(server.stats.snapshot()["requests"], 1)
        response, _ = request(server, "POST", "/_proxy/reset", headers={"Origin": own.upper()})
        self.assertEqual(response.status, 200)
        self.assertEqual(server.stats.snapshot()["requests"], 0)
        request(server, "GET", "/v1/models")
        self.assertTrue(wait_until(lambda: server.stats.snapshot()["requests"] == 1))
        response, _ = request(server, "POST", "/_proxy/reset")       # curl: no Origin at all
        self.assertEqual(response.status, 200)
        self.assertEqual(server.stats.snapshot()["requests"], 0)

    def test_reset_with_an_admin_token_needs_it(self):
        server = start_quiet_proxy(self, self.backend.port, admin_token="s3cret")
        own = "https://localhost:%d" % server.server_address[1]
        request(server, "GET", "/v1/models")
        self.assertTrue(wait_until(lambda: server.stats.snapshot()["requests"] == 1))
        refused = [
            ({}, 401), ({"Authorization": "Bearer wrong"}, 401),
            ({"Authorization": "Bearer s3cret2"}, 401), ({"Authorization": "Bearer s3cre"}, 401),
            ({"Authorization": "Basic s3cret"}, 401), ({"Authorization": "s3cret"}, 401),
            ({"X-Admin-Token": "s3cret"}, 401), ({"Origin": own}, 401),
            ({"Authorization": "Bearer s3cret", "Origin": "https://evil.example"}, 403),
        ]
        for headers, status in refused:
            with self.subTest(headers=headers):
                response, body = request(server, "POST", "/_proxy/reset", headers=headers)
                self.assertEqual(response.status, status, body)
                self.assertNotIn(b"s3cret", body)
                self.assertEqual(server.stats.snapshot()["requests"], 1, "stats were reset")
        response, _ = request(server, "POST", "/_proxy/reset",
                              headers={"Authorization": "Bearer s3cret", "Origin": own})
        self.assertEqual(response.status, 200)
        self.assertEqual(server.stats.snapshot()["requests"], 0)
        request(server, "GET", "/v1/models")
        self.assertTrue(wait_until(lambda: server.stats.snapshot()["requests"] == 1))
        response, _ = request(server, "POST", "/_proxy/reset",
                              headers={"Authorization": "Bearer s3cret"})
        self.assertEqual(response.status, 200)
        self.assertEqual(server.stats.snapshot()["requests"], 0)

    def test_credentials_never_reach_the_log_or_the_stats(self):
        """The proxy logger at DEBUG through a success, a 502, a 504, 400/431 refusals (one with
        a control character in x-api-key itself), a preflight, a refused origin and a refused
        reset, all carrying Authorization and x-api-key: neither value (nor a ?key= query)
        appears in the log, /_proxy/stats, /_proxy/metrics or stats.json."""
        logs = LogCapture(self)
        server = start_quiet_proxy(self, self.backend.port, read_timeout=0.5, admin_token="s3cret",
                             allowed_origins=("https://app.example",))
        target = "/v1/chat/completions?key=sk-QUERY-789"
        body = b'{"model": "m", "messages": []}'
        response, _ = request(server, "POST", target, body=body, headers=CREDENTIALS)
        self.assertEqual(response.status, 200)
        self.assertIn(b"sk-SECRET-123", self.backend.requests[0][0], "credentials not forwarded")
        for behaviour, status in ((reset_before_headers, 502), (stall_before_headers, 504)):
            self.backend.behaviour = behaviour
            response, _ = request(server, "POST", target, body=body, headers=CREDENTIALS)
            self.assertEqual(response.status, status)
        self.backend.behaviour = answer_ok
        auth = b"Authorization: Bearer sk-SECRET-123\r\nx-api-key: sk-ant-SECRET-456\r\n"
        for data, status in (
                (b"POST " + target.encode() + b" HTTP/1.1\r\nHost: x\r\n" + auth +
                 b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
                (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth.replace(b"456", b"456\x01") +
                 b"\r\n", 400),
                (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                 + auth.replace(b"123", b"123" + b"A" * 20000) + b"\r\n", 431),
                (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: x\r\n\r\n",
                 400)):
            reply, _ = raw_exchange(server, data)
            self.assertEqual(status_of(reply), status, reply[:100])
        response, _ = request(server, "OPTIONS", target, headers=dict(CREDENTIALS, **{
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, x-api-key"}))
        self.assertEqual(response.status, 204)
        response, _ = request(server, "POST", target, body=body,
                              headers=dict(CREDENTIALS, Origin="https://evil.example"))
        self.assertEqual(response.status, 403)
        response, _ = request(server, "POST", "/_proxy/reset", headers=CREDENTIALS)
        self.assertEqual(response.status, 401)
        # Recorded: the 200, the 502, the 504 and the chunked POST refused mid-body (400).
        self.assertTrue(wait_until(lambda: server.stats.snapshot()["requests"] == 4))

        logged = logs.text.getvalue()
        self.assertIn("/v1/chat/completions", logged)            # the capture works
        self.assertIn(" 502", logged)
        admin = {"Authorization": "Bearer s3cret"}        # stats and metrics need it (issue 11)
        documents = {"log": logged,
                     "stats": request(server, "GET", "/_proxy/stats", headers=admin)[1].decode(),
                     "metrics": request(server, "GET", "/_proxy/metrics", headers=admin)[1].decode()}
        self.assertIn('"requests":4', documents["stats"])
        self.assertTrue(server.stats.save())
        with open(server.config.stats_file, encoding="utf-8") as handle:
            documents["stats.json"] = handle.read()
        for name, text in documents.items():
            for secret in SECRETS + ("s3cret",):
                self.assertNotIn(secret, text, "%s contains %s" % (name, secret))
