"""Hostile clients and hostile backends (issue 8): the proxy stays up, frees what it took, and
never lets one request leak into another.

Everything runs on 127.0.0.1 with real sockets and real TLS. Each test says which bug would make
it fail. Two knobs scale the heavy tests down (defaults are the issue's figures):

    HOSTILE_GARBAGE_CONNECTIONS=10000   connections of garbage in GarbageTests
    HOSTILE_KILL_RUNS=30                kill -9 runs in StatsDurabilityTests

Tests marked @unittest.expectedFailure show a bug in proxy.py; the comment names the patch in
/work/drafts/hostile/patches/ that fixes it (remove the decorator once it is applied).
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
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
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
            return [self.format(r) for r in self.records if r.exc_info or "unexpected" in r.getMessage()]


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
            if not line.endswith(b"\r\n"):
                return None
            size = int(line.split(b";")[0], 16)
            data = reader.read(size + 2) if size else b""
            if size and (len(data) < size + 2 or not data.endswith(b"\r\n")):
                return None
            body += data[:-2]
            if not size:
                if reader.readline(1000) != b"\r\n":
                    return None
                return head, body
    length = int(fields.get(b"content-length", b"0"))
    body = reader.read(length) if length else b""
    if len(body) < length:
        return None
    return head, body


def answer_ok(backend, sock, request, n):
    """A well-behaved backend: a small JSON answer on a keep-alive connection."""
    body = b'{"ok":true,"n":%d}' % n
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
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
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        test.addCleanup(self.close, accept)

    def close(self, accept):
        self.release.set()
        accept.join(5)
        self.listener.close()
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
        except (OSError, ValueError) as exc:
            print("BACKEND EXC", repr(exc))
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


def warm_up(test, server) -> None:
    """One request, so that the pooled backend connection (and the fake backend's thread for
    it) exist before a test counts threads; waits until the proxy's worker thread has ended."""
    before = threading.active_count()
    test.assertEqual(request(server, "GET", "/warm-up")[0].status, 200)
    test.assertTrue(wait_until(lambda: threading.active_count() <= before + 1))


def dead_port(test) -> int:
    """A port on which connections are refused: bound, never listening, held until cleanup."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    test.addCleanup(holder.close)
    return holder.getsockname()[1]


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
        self.proxy = start_proxy(self, self.upstream.port, client_timeout=self.CLIENT_TIMEOUT)
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

    @unittest.expectedFailure   # patches/01-request-head-deadline.diff
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
    def test_ten_thousand_garbage_connections_leak_nothing(self):
        """Random bytes, truncated ClientHellos, and full TLS handshakes followed by garbage
        (raw bytes under TLS, or random bytes inside it): fails on any exception escaping a
        worker, on a leaked thread or file descriptor, if garbage reaches the backend or the
        stats, or if the proxy stops answering afterwards."""
        needs_proc(self)
        upstream = start_upstream(self)
        server = start_proxy(self, upstream.port, client_timeout=2.0)
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
    ("Content-Length with a plus sign", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", {400}),
    ("negative Content-Length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nhello", {400}),
    ("hexadecimal Content-Length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello", {400}),
    ("Content-Length with inner space", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5 5\r\n\r\nhello", {400}),
    ("empty Content-Length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\nhello", {400}),
    ("Content-Length of 20 digits",
     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551621\r\n\r\nhello", {400}),
    ("negative chunk size",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n", {400}),
    ("chunk size 0x10",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x10\r\n" + b"a" * 16 +
     b"\r\n0\r\n\r\n", {400}),
    ("chunk size of 17 hex digits (overflows 64 bits)",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1" + b"0" * 16 +
     b"\r\nab\r\n0\r\n\r\n", {400}),
    ("chunk size after a space",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n", {400}),
    ("chunk size with an inner space",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1 0\r\n" + b"a" * 16 +
     b"\r\n0\r\n\r\n", {400}),
    ("empty chunk size line",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\r\n0\r\n\r\n", {400}),
    ("chunk longer than its size",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n", {400}),
    ("chunk size line ending in a bare LF",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", {400}),
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
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", {400, 501}),
    ("Transfer-Encoding: xchunked",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", {400, 501}),
    ("Transfer-Encoding: identity",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\nhello", {400, 501}),
    ("Transfer-Encoding chunked twice",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", {400, 501}),
    ("Transfer-Encoding with a vertical tab",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n", {400, 501}),
    ("Transfer-Encoding in HTTP/1.0",
     b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}),
    ("absolute-form URI naming the backend itself", None, {400}),
    ("authority-form target", b"GET localhost:443 HTTP/1.1\r\nHost: localhost\r\n\r\n", {400}),
    ("lower-case connect method", b"connect localhost:443 HTTP/1.1\r\nHost: localhost\r\n\r\n", {400, 405}),
    ("asterisk-form with GET", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 505}),
    ("two spaces in the request line", b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
]


class MalformedRequestTests(unittest.TestCase):
    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_proxy(self, self.backend.port)

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

    @unittest.expectedFailure   # patches/02-request-framing-hygiene.diff
    def test_non_ascii_digits_in_content_length_get_400(self):
        """'²' (0xB2 as Latin-1) passes str.isdigit() but not int(): the handler thread dies with
        a ValueError traceback and the client gets no answer at all instead of a 400."""
        logs = LogCapture(self)
        for value in (b"\xb2", b"1\xb3", b"\xb9\xb9"):
            reply, closed = raw_exchange(self.proxy, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                         + value + b"\r\n\r\nab" + SMUGGLED)
            self.assertEqual(status_of(reply), 400, (value, reply[:80]))
            self.assertTrue(closed)
        self.assertEqual(logs.unexpected(), [])
        self.assertEqual(self.backend.paths(), [])

    @unittest.expectedFailure   # patches/02-request-framing-hygiene.diff
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
        self.proxy = start_proxy(self, self.backend.port)

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
                                b"GET /admin HTTP/1.1\r\nHost: internal\r\nConnection: close\r\n\r\n")
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
        self.proxy = start_proxy(self, self.backend.port, read_timeout=self.READ_TIMEOUT)
        self.logs = LogCapture(self)
        self.client = https(self.proxy, timeout=10)
        self.addCleanup(self.client.close)

    def get(self, conn=None, method="GET", path="/v1/models", body=None):
        conn = conn or self.client
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response, response.read()

    def assert_counted_and_recovers(self, errors_before, expected_errors=1, conn=None):
        self.assertTrue(wait_until(lambda: errors(self.proxy) == errors_before + expected_errors),
                        "errors: %d, expected %d" % (errors(self.proxy), errors_before + expected_errors))
        self.backend.behaviour = answer_ok
        response, data = self.get(conn)
        self.assertEqual(response.status, 200, data)
        self.assertEqual(errors(self.proxy), errors_before + expected_errors)
        self.assertEqual(self.logs.unexpected(), [])

    def test_refused_then_the_backend_comes_back(self):
        holder = socket.socket()                     # bound, not listening: connect is refused
        holder.bind(("127.0.0.1", 0))
        server = start_proxy(self, holder.getsockname()[1])
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
        error is counted; the backend DID receive that request twice (once on the dying
        connection): the retry is safe only because that backend never acted on it."""
        self.backend.behaviour = close_second_request_unanswered
        before = errors(self.proxy)
        self.assertEqual(self.get(path="/first")[0].status, 200)
        response, data = self.get(method="POST", path="/v1/chat/completions", body=b"{}")
        self.assertEqual(response.status, 200, data)
        self.assertEqual(self.backend.paths(), ["/first", "/v1/chat/completions",
                                                "/v1/chat/completions"])
        self.assertEqual(errors(self.proxy), before)

    def test_streamed_upload_on_a_connection_closed_as_it_is_reused_gives_502(self):
        """A body over the buffering limit is streamed, so it cannot be sent again: 502."""
        self.backend.behaviour = close_second_request_unanswered
        before = errors(self.proxy)
        self.assertEqual(self.get(path="/first")[0].status, 200)
        body = b"x" * (proxy.BODY_BUFFER_LIMIT + 1)
        response, data = self.get(method="POST", path="/v1/upload", body=body)
        self.assertEqual(response.status, 502, data)
        self.assert_counted_and_recovers(before, conn=https(self.proxy))


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
        self.proxy = start_proxy(self, self.backend.port, client_timeout=2.0)
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
                ended_before = len(self.backend.ended)
                sock = tls_socket(self.proxy)
                sock.sendall(b"POST /v1/upload-%d HTTP/1.1\r\nHost: localhost\r\n%s\r\n\r\n%s"
                             % (index, framing, sent))
                if streamed:            # the proxy has begun sending it upstream
                    self.assertTrue(wait_until(lambda: len(self.backend.raw) > 1 + ended_before
                                               or self.backend.connections > ended_before + 1, 3)
                                    or True)
                time.sleep(0.05)        # let the proxy pass on what it has
                left_at = time.monotonic()
                abort(sock) if reset else sock.close()
                self.assertTrue(wait_until(lambda: errors(self.proxy) == errors_before + 1, 3),
                                "the aborted upload was not counted as an error")
                self.assertTrue(wait_until(lambda: threading.active_count() <= self.baseline_threads, 3))
                if streamed:
                    self.assertTrue(wait_until(lambda: self.backend.partial == partial_before + 1, 3),
                                    "the backend never saw the partial request end")
                    self.assertLess(self.backend.ended[-1] - left_at, 1.0)
                else:
                    self.assertEqual(self.backend.partial, partial_before,
                                     "a small body is buffered: nothing should reach the backend")
                self.assertNotIn("/v1/upload-%d" % index, self.backend.paths())
        self.assertEqual(self.backend.paths(), ["/warm-up"])
        self.assertEqual(request(self.proxy, "GET", "/after")[0].status, 200)

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
                self.assertTrue(wait_until(lambda: errors(self.proxy) == errors_before + 1, 3))
                self.assertTrue(wait_until(
                    lambda: threading.active_count() <= self.baseline_threads, 3),
                    "threads: %d now, %d before" % (threading.active_count(), self.baseline_threads))
        self.backend.behaviour = answer_ok
        self.assertEqual(request(self.proxy, "GET", "/after")[0].status, 200)
