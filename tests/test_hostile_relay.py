"""Issue 16's streaming hot path against hostile backends and odd clients.

The relay now passes whole chunks on as the backend framed them (UpstreamResponse.read_framed,
BodyPipe.framed), skips the "anything behind it?" poll after a piece that ends a line
(Exchange.read_available), and short-cuts whole one-line SSE events (_UsageSseReader.feed,
InjectedUsageStripper._on_event). None of that may weaken what earlier issues guarantee: no
response smuggling or desync (between backend and client, or between two clients sharing a
pooled backend connection), an abort when the backend dies mid-body, late bytes discard the
connection, exact usage, injected usage stripped exactly, and a burst of tiny chunks leaving in
few writes.

Tests whose docstring starts with "Was a flaw" failed when written, on the code of 20ee2de
(the cause is in the docstring); 65a4094 mended them. Every test is now a guard. The backends
are raw socket scripts (test_hostile.ScriptedBackend), as in test_framing.py; the read_framed
split tests drive UpstreamResponse over a scripted socket, so every recv boundary is exact.

Run: python3 tests/run.py test_hostile_relay
"""

import functools
import http.client
import io
import json
import random
import re
import ssl
import unittest

from support import proxy, https, tls_socket, settled_stats, wait_until
from test_hostile import ScriptedBackend, LogCapture, start_quiet_proxy

CHUNKED_SSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
SECRET = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 20\r\n\r\n"
          b"first user's secret!")


def chunk(data: bytes, size_line: bytes = None) -> bytes:
    return (size_line if size_line is not None else b"%x" % len(data)) + b"\r\n" + data + b"\r\n"


def path_of(request) -> bytes:
    return request[0].split(b" ", 2)[1]


def answer(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


def parse_chunked(body: bytes):
    """Strictly parse a chunked body: (complete, data, chunk sizes, bytes after the end)."""
    pos, out, sizes = 0, [], []
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            return False, b"".join(out), sizes, b""
        line = body[pos:end]
        if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", line):
            raise ValueError("bad size line %r" % line[:40])
        size = int(line, 16)
        if size == 0:
            if body[end + 2:end + 4] == b"\r\n":
                return True, b"".join(out), sizes, body[end + 4:]
            return False, b"".join(out), sizes, b""
        if len(body) < end + 4 + size:
            return False, b"".join(out), sizes, b""
        if body[end + 2 + size:end + 4 + size] != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")
        out.append(body[end + 2:end + 2 + size])
        sizes.append(size)
        pos = end + 4 + size


def read_reply(sock, until_complete=True):
    """Read one HTTP/1.1 reply from a raw socket: (head, body, closed, aborted).

    With until_complete, stops at the end of a complete chunked body (the connection may stay
    open); otherwise reads until the proxy closes or aborts.
    """
    data = b""
    closed = aborted = False
    try:
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            if until_complete and sep and data.endswith(b"\r\n\r\n") \
                    and parse_chunked(body)[0]:
                break
            piece = sock.recv(1 << 20)
            if not piece:
                closed = True
                break
            data += piece
    except (ConnectionError, ssl.SSLError):
        closed = aborted = True
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body, closed, aborted


def exchange(server, request: bytes, timeout=10.0, until_complete=True):
    sock = tls_socket(server, timeout)
    try:
        sock.sendall(request)
        return read_reply(sock, until_complete)
    finally:
        sock.close()


GET = b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\n\r\n"


def get_other(server, path=b"/second"):
    head, body, _, _ = exchange(server, b"GET %s HTTP/1.1\r\nHost: localhost\r\n"
                                b"Connection: close\r\n\r\n" % path, until_complete=False)
    return body


# ==================================================================================================
# read_framed over a scripted socket: every recv boundary, every size-line form
# ==================================================================================================

class _ScriptedRaw(io.RawIOBase):
    """A raw stream whose reads return exactly the scripted pieces (one recv each)."""

    def __init__(self, pieces):
        self.pieces = [p for p in pieces if p]

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self.pieces:
            return 0
        piece = self.pieces.pop(0)
        n = min(len(buffer), len(piece))
        buffer[:n] = piece[:n]
        if n < len(piece):
            self.pieces.insert(0, piece[n:])
        return n


class _ScriptedSocket:
    def __init__(self, pieces):
        self.raw = _ScriptedRaw(pieces)

    def makefile(self, mode):
        return io.BufferedReader(self.raw)

    def gettimeout(self):
        return None

    def settimeout(self, timeout):
        pass


def relay_scripted(pieces):
    """What an HTTP/1.1 client receives when the backend's bytes arrive as `pieces`.

    Drives BodyPipe as relay_response does (read_framed first, read1 otherwise; read1 stands
    in for read_available, whose readiness poll needs a real socket). Returns (client body,
    error or None, response).
    """
    response = proxy.UpstreamResponse(_ScriptedSocket(pieces), method="GET")
    response.begin()
    body = proxy.BodyPipe(functools.partial(response.read1, proxy.READ_CHUNK), None, None,
                          functools.partial(response.read_framed, proxy.READ_CHUNK),
                          keep_framing=True)
    out = []
    try:
        while True:
            data = body.read()
            if not data:
                break
            framed = body.framed
            out.append(framed if framed is not None else b"%x\r\n%s\r\n" % (len(data), data))
    except (http.client.HTTPException, ValueError, OSError) as exc:
        # Closed here, as relay_response's error paths do: left to the garbage collector with
        # the traceback's frames, Python 3.13 may close its buffer first and then print
        # "Exception ignored" for the response's own close().
        response.close()
        return b"".join(out), exc, response
    out.append(b"0\r\n\r\n")
    return b"".join(out), None, response


def random_chunked_body(rng, corrupt=False):
    """(wire, data, kind): a chunked body mixing every size-line form and chunk size.

    kind: "ok", "late" (bytes after the last chunk) or "bad" (a framing error somewhere).
    """
    parts, data = [], []
    kind = "ok"
    for _ in range(rng.randrange(1, 9)):
        size = rng.choice((1, 2, 15, 16, 17, 40, 300, 5000, 9000))
        payload = bytes(rng.choice(b"ab\r\n0:;x") for _ in range(size))
        if rng.random() < 0.2 and size >= 16:
            payload = (b"\r\n0\r\n\r\n" + SECRET).ljust(size, b"p")[:size]   # a fake end inside
        digits = b"%x" % size
        form = rng.random()
        if form < 0.15:
            line = digits.upper()
        elif form < 0.3:
            line = digits.rjust(8, b"0")
        elif form < 0.4:
            line = digits.rjust(9, b"0")                           # too long for read_framed
        elif form < 0.5:
            line = digits + b";ext=1"
        elif form < 0.55:
            line = digits + b" "
        else:
            line = digits
        parts.append(line + b"\r\n" + payload + b"\r\n")
        data.append(payload)
    if corrupt:
        kind = "bad"
        at = rng.randrange(len(parts))
        part = parts[at]
        how = rng.randrange(4)
        if how == 0:
            parts[at] = part[:-2]                                  # CRLF after data missing
        elif how == 1:
            parts[at] = part[:-2] + b"\n"                          # LF instead of CRLF
        elif how == 2:
            parts[at] = part[:-2] + b"XY"                          # other bytes
        else:
            parts[at] = part[:-3] + b"\r\n"                        # data shorter than its size
        data = data[:at]
    end = rng.choice((b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n", b"00000000\r\n\r\n"))
    parts.append(end)
    if corrupt:
        # The proxy may pass on what read1() reads as the broken chunk's data before it sees
        # the framing error (as b55a019 did): the bytes after that chunk's size line.
        data.append(parts[at].split(b"\n", 1)[1] + b"".join(parts[at + 1:]))
    if not corrupt and rng.random() < 0.3:
        parts.append(SECRET)
        kind = "late"
    return b"".join(parts), b"".join(data), kind


def random_cuts(wire, rng):
    pieces, pos = [], 0
    while pos < len(wire):
        step = rng.choice((1, 2, 3, 5, 8, 20, 100, 4000, 10000))
        pieces.append(wire[pos:pos + step])
        pos += step
    return pieces


class FramedPassThroughTests(unittest.TestCase):
    """Whole chunks go out as the backend framed them; everything else is decoded strictly."""

    HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    def assert_relays(self, wire, expected, kind, pieces, label=""):
        client, error, response = relay_scripted([self.HEAD] + pieces)
        if kind == "bad":
            self.assertIsNotNone(error, label)
            # Whatever reached the client is valid framing holding a prefix of the real data,
            # and no clean end.
            complete, data, _, _ = parse_chunked(client)
            self.assertFalse(complete, label)
            self.assertTrue(expected.startswith(data), label)
            return
        self.assertIsNone(error, label)
        complete, data, _, rest = parse_chunked(client)
        self.assertTrue(complete, label)
        self.assertEqual(rest, b"", label)
        self.assertEqual(data, expected, label)
        self.assertEqual(response.overran, kind == "late", label)
        if kind == "ok":
            self.assertTrue(response.reusable(), label)

    def test_every_cut_of_framed_small_and_odd_chunks(self):
        wire = (chunk(b"0123456789abcdef") + chunk(b"x" * 18, b"00000012")
                + chunk(b"q") + chunk(b"\r\n0\r\n\r\n" + b"s" * 10, b"11")
                + chunk(b"y" * 26, b"1A") + chunk(b"z" * 16, b"10;e=1")
                + b"0\r\nX-T: 1\r\n\r\n")
        expected = (b"0123456789abcdef" + b"x" * 18 + b"q" + b"\r\n0\r\n\r\n" + b"s" * 10
                    + b"y" * 26 + b"z" * 16)
        for i in range(len(wire) + 1):
            for j in sorted({i, min(len(wire), i + 1), min(len(wire), i + 2),
                             min(len(wire), i + 7)}):
                self.assert_relays(wire, expected, "ok", [wire[:i], wire[i:j], wire[j:]],
                                   "cuts at %d, %d" % (i, j))
        self.assert_relays(wire, expected, "ok", [wire[i:i + 1] for i in range(len(wire))],
                           "bytewise")

    def test_random_hostile_bodies_at_random_cuts(self):
        rng = random.Random(20261127)
        for case in range(400):
            wire, expected, kind = random_chunked_body(rng, corrupt=case % 3 == 0)
            for cuts in ([wire], random_cuts(wire, rng), random_cuts(wire, rng)):
                self.assert_relays(wire, expected, kind, cuts, "case %d %r" % (case, wire[:200]))

    def test_the_size_line_forms_that_pass_on_framed(self):
        # Only hex digits (1 to 8) and CRLF; the data at least FRAMED_CHUNK_MIN bytes.
        n = proxy.FRAMED_CHUNK_MIN
        for wire, framed in ((chunk(b"a" * n), True), (chunk(b"a" * n, b"%08X" % n), True),
                             (chunk(b"a" * (n - 1), b"0%x" % (n - 1)), False),
                             (chunk(b"a" * n, b"%09x" % n), False),
                             (chunk(b"a" * n, b"%x;x" % n), False),
                             (chunk(b"a" * n, b"%x " % n), False),
                             (b"%x\n" % n + b"a" * n + b"\r\n", False)):
            with self.subTest(wire=wire):
                client, error, _ = relay_scripted([self.HEAD + wire + b"0\r\n\r\n"])
                self.assertIsNone(error)
                self.assertEqual(client.startswith(wire), framed, client)
                self.assertEqual(parse_chunked(client)[1], b"a" * len(wire.split(b"\n", 1)[1][:-2]))


# ==================================================================================================
# Through the proxy: framing, aborts, pooling, pipelining, HTTP/1.0
# ==================================================================================================

class HostileFramedBackendTests(unittest.TestCase):

    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port)
        self.logs = LogCapture(self)

    def first_then_answers(self, first: bytes, keep_open=True):
        """The first request gets `first` (raw bytes, one send); later ones a small answer."""
        def behaviour(backend, sock, request, n):
            if len(backend.requests) == 1:
                sock.sendall(first)
                return keep_open
            sock.sendall(answer(b"answer for " + path_of(request)))
            return True
        self.backend.behaviour = behaviour

    def test_a_fake_last_chunk_and_response_inside_framed_data_stay_data(self):
        data = b"data: x\r\n0\r\n\r\n" + SECRET + b"\n\n"
        self.first_then_answers(CHUNKED_SSE + chunk(data) + chunk(b"y" * 20) + b"0\r\n\r\n")
        head, body, closed, _ = exchange(self.proxy, GET)
        complete, received, _, rest = parse_chunked(body)
        self.assertTrue(complete)
        self.assertEqual((received, rest), (data + b"y" * 20, b""))
        self.assertEqual(get_other(self.proxy), b"answer for /second")
        self.assertEqual(self.backend.connections, 1)     # a clean end: the connection is reused

    def test_late_bytes_behind_framed_chunks_in_one_recv_discard_the_connection(self):
        self.first_then_answers(CHUNKED_SSE + chunk(b"a" * 16) + chunk(b"b" * 40)
                                + b"0\r\n\r\n" + SECRET)
        _, body, _, _ = exchange(self.proxy, GET)
        self.assertEqual(parse_chunked(body)[:2], (True, b"a" * 16 + b"b" * 40))
        self.assertEqual(get_other(self.proxy), b"answer for /second")
        self.assertEqual(self.backend.connections, 2)
        self.assertIn("past the end of its response", self.logs.text.getvalue())

    def test_trailers_in_the_same_recv_as_framed_chunks(self):
        self.first_then_answers(CHUNKED_SSE + chunk(b"a" * 16) + chunk(b"b" * 17)
                                + b"0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n")
        _, body, _, _ = exchange(self.proxy, GET)
        self.assertEqual(parse_chunked(body), (True, b"a" * 16 + b"b" * 17, [16, 17], b""))
        self.assertNotIn(b"X-Trailer", body)
        self.assertEqual(get_other(self.proxy), b"answer for /second")
        self.assertEqual(self.backend.connections, 1)

    def test_broken_chunk_endings_abort_the_client_and_the_backend_connection(self):
        good = chunk(b"g" * 16)
        for tail in (b"10\r\n" + b"h" * 16 + b"10\r\n" + b"i" * 16 + b"\r\n",    # CRLF missing
                     b"10\r\n" + b"h" * 16 + b"\n" + chunk(b"i" * 16),           # LF only
                     b"10\r\n" + b"h" * 16 + b"XY" + chunk(b"i" * 16),           # other bytes
                     b"11\r\n" + b"h" * 16 + b"\r\n" + chunk(b"i" * 16)):        # size too big
            with self.subTest(tail=tail):
                ended = len(self.backend.ended)
                requests = len(self.backend.requests)

                def behaviour(backend, sock, request, n, tail=tail):
                    if len(backend.requests) == requests + 1:
                        sock.sendall(CHUNKED_SSE + good + tail + b"0\r\n\r\n")
                        return True          # keep reading: only the proxy's close ends it
                    sock.sendall(answer(b"answer for " + path_of(request)))
                    return True
                self.backend.behaviour = behaviour
                _, body, closed, _ = exchange(self.proxy, GET, until_complete=False)
                self.assertTrue(closed)
                complete, received, _, _ = parse_chunked(body)
                self.assertFalse(complete, "a clean end after a broken chunk: %r" % body)
                # What read1() took for the broken chunk's data may have gone out first.
                self.assertTrue((b"g" * 16 + tail.split(b"\n", 1)[1]).startswith(received),
                                received)
                self.assertNotIn(b"i" * 16, body)
                self.assertTrue(wait_until(lambda: len(self.backend.ended) == ended + 1))
                self.assertEqual(get_other(self.proxy), b"answer for /second")

    def test_backend_death_after_whole_framed_chunks_aborts_the_client(self):
        self.first_then_answers(CHUNKED_SSE + chunk(b"a" * 16) + chunk(b"b" * 300),
                                keep_open=False)
        _, body, closed, _ = exchange(self.proxy, GET, until_complete=False)
        self.assertTrue(closed)
        complete, received, _, _ = parse_chunked(body)
        self.assertFalse(complete)
        self.assertEqual(received, b"a" * 16 + b"b" * 300)
        self.assertEqual(settled_stats(self.proxy)["errors"], 1)

    def test_an_http10_client_gets_the_data_unframed_and_the_close(self):
        self.first_then_answers(CHUNKED_SSE + chunk(b"a" * 16, b"00000010") + chunk(b"q")
                                + chunk(b"b" * 40, b"28") + b"0\r\n\r\n")
        head, body, closed, aborted = exchange(
            self.proxy, b"GET /v1/stream HTTP/1.0\r\nHost: localhost\r\n\r\n", until_complete=False)
        self.assertNotIn(b"chunked", head.lower())
        self.assertEqual(body, b"a" * 16 + b"q" + b"b" * 40)
        self.assertTrue(closed and not aborted)

    def test_pipelined_requests_after_a_framed_stream_stay_in_order(self):
        self.first_then_answers(CHUNKED_SSE + chunk(b"data: 1\n\n" * 4) + chunk(b"data: 2\n\n" * 4)
                                + b"0\r\n\r\n")
        sock = tls_socket(self.proxy)
        self.addCleanup(sock.close)
        sock.sendall(GET + b"GET /next HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = read_reply(sock, until_complete=False)
        reply = b"\r\n\r\n".join(data[:2])
        head, _, rest = reply.partition(b"\r\n\r\n")
        complete, received, _, after = parse_chunked(rest)
        self.assertTrue(complete)
        self.assertEqual(received, b"data: 1\n\n" * 4 + b"data: 2\n\n" * 4)
        self.assertTrue(after.startswith(b"HTTP/1.1 200 "), after[:80])
        self.assertTrue(after.endswith(b"\r\n\r\nanswer for /next"), after[-80:])

    def test_head_of_a_chunked_answer_keeps_the_connection_in_step(self):
        def behaviour(backend, sock, request, n):
            if request[0].startswith(b"HEAD "):
                sock.sendall(CHUNKED_SSE)
            else:
                sock.sendall(CHUNKED_SSE + chunk(b"a" * 16) + b"0\r\n\r\n")
            return True
        self.backend.behaviour = behaviour
        conn = https(self.proxy)
        self.addCleanup(conn.close)
        conn.request("HEAD", "/v1/stream")
        response = conn.getresponse()
        self.assertEqual(response.read(), b"")
        conn.request("GET", "/v1/stream")
        response = conn.getresponse()
        self.assertEqual(response.read(), b"a" * 16)


# ==================================================================================================
# Usage through framed chunks: exact counts, injected usage stripped exactly
# ==================================================================================================

def openai_events(include_usage: bool, count=12):
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = []
    for i in range(count):
        event = dict(base, choices=[{"index": 0, "delta": {"content": " w%d" % i},
                                     "finish_reason": None}])
        if include_usage:
            event["usage"] = None
        events.append(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
    if include_usage:
        events.append(b"data: " + json.dumps(dict(base, choices=[], usage={
            "prompt_tokens": 11, "completion_tokens": count, "total_tokens": 11 + count}),
            separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


class UsageThroughFramedChunksTests(unittest.TestCase):

    def run_stream(self, body_of, request_body):
        def behaviour(backend, sock, request, n):
            sock.sendall(CHUNKED_SSE + body_of())
            return True
        backend = ScriptedBackend(self, behaviour)
        server = start_quiet_proxy(self, backend.port)
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                   b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(request_body), request_body))
        _, body, _, _ = exchange(server, request)
        complete, received, _, _ = parse_chunked(body)
        self.assertTrue(complete)
        return received, settled_stats(server), backend

    def test_usage_is_exact_when_many_framed_events_arrive_in_one_recv(self):
        events = openai_events(True)
        # Events one per chunk, several per chunk, one split over two chunks (one of them small).
        body = b"".join(chunk(e) for e in events[:5]) + chunk(b"".join(events[5:8]))
        usage_event = events[-2]
        body += b"".join(chunk(e) for e in events[8:-2])
        body += chunk(usage_event[:7]) + chunk(usage_event[7:]) + chunk(events[-1]) + b"0\r\n\r\n"
        received, stats, _ = self.run_stream(lambda: body, b'{"model":"m","stream":true,'
                                             b'"stream_options":{"include_usage":true}}')
        self.assertEqual(received, b"".join(events))
        self.assertEqual((stats["tokens"]["prompt"], stats["tokens"]["completion"]), (11, 12))

    def test_injected_usage_is_stripped_exactly_from_framed_events(self):
        events = openai_events(True)
        body = b"".join(chunk(e) for e in events[:6]) + chunk(b"".join(events[6:])) + b"0\r\n\r\n"
        received, stats, backend = self.run_stream(lambda: body,
                                                   b'{"model":"m","stream":true}')
        self.assertIn(b"include_usage", backend.requests[0][1])
        plain = openai_events(False)
        self.assertEqual(received, b"".join(plain))
        self.assertEqual((stats["tokens"]["prompt"], stats["tokens"]["completion"]), (11, 12))


class StripperEdgeTests(unittest.TestCase):

    def strip(self, stream, cuts=None):
        stripper = proxy.InjectedUsageStripper()
        pieces = cuts if cuts is not None else [stream]
        return b"".join(stripper.feed(p) for p in pieces) + stripper.finish()

    def test_every_cut_strips_the_same(self):
        events = b"".join(openai_events(True, 4))
        expected = b"".join(openai_events(False, 4))
        for size in (1, 2, 3, 7, 16, 100):
            self.assertEqual(self.strip(events, [events[i:i + size]
                                                 for i in range(0, len(events), size)]), expected)

    def test_a_leading_bom_is_stripped_with_crlf_lines_too(self):
        """Was a flaw (also on b55a019): a stream that starts with a BOM keeps
        ,"usage":null in its first event when its lines end in CRLF.

        Cause: _strip_null_usage only edits lines starting with b"d"; the first raw line starts
        with the BOM (the reader strips it only for parsing). With LF endings the new one-line
        edit in _on_event now strips it (it tests the line's end), so the client's bytes depend
        on the line endings. Fix: in _strip_null_usage, look at raw_line[3:] when the line
        starts with _USAGE_BOM (keeping the BOM in the output).
        """
        for end in (b"\n", b"\r\n"):
            with self.subTest(end=end):
                stream = (b'\xef\xbb\xbfdata: {"id":"c","choices":[],"usage":null}' + end + end
                          + b'data: {"id":"c","choices":[],"usage":null}' + end + end)
                self.assertEqual(self.strip(stream),
                                 b'\xef\xbb\xbfdata: {"id":"c","choices":[]}' + end + end
                                 + b'data: {"id":"c","choices":[]}' + end + end)


# ==================================================================================================
# Tiny chunks still leave in few writes (issue 14's 2-million-chunk burst)
# ==================================================================================================

class TinyNewlineChunkTests(unittest.TestCase):

    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port)

    def burst(self, body: bytes):
        def behaviour(backend, sock, request, n):
            sock.sendall(CHUNKED_SSE + body + b"0\r\n\r\n")
            return True
        self.backend.behaviour = behaviour
        head, body, _, _ = exchange(self.proxy, GET, timeout=30)
        complete, data, sizes, _ = parse_chunked(body)
        self.assertTrue(complete)
        return data, sizes

    def test_a_burst_of_one_byte_newline_chunks_is_coalesced(self):
        """Was a flaw: 100,000 one-byte chunks of b"\\n" reach the client as 100,000 chunks, one
        TLS write each (b55a019: under a tenth of that) -- issue 14's 2-million-chunk burst
        is back for a body of newlines (blank SSE lines, keep-alive newlines).

        Cause: read_available() returns a piece ending in b"\\n" without the read_ready() poll,
        so nothing behind it is joined; a 1-byte chunk never takes read_framed's path.
        Fix: skip the poll after a line's end only when the body is not chunked
        (`data[-1:] == b"\\n" and not response.chunked`): read1() then returned all that was
        buffered; a chunked body's whole chunks take read_framed, which joins them already.
        """
        count = 100000
        data, sizes = self.burst(b"1\r\n\n\r\n" * count)
        self.assertEqual(data, b"\n" * count)
        self.assertLess(len(sizes), count // 10, "%d writes for %d chunks" % (len(sizes), count))

    def test_lines_and_blank_lines_in_separate_chunks_leave_together(self):
        """Was a flaw: a burst of events sent as two chunks each (the data line, then the blank
        line: servers that flush per line) leaves in ~1.4 writes per event (b55a019 and the
        fix: under 0.1).

        Cause: read_framed passes the line's chunk (>= 16 bytes) on alone, then stops at the
        1-byte chunk; read_available returns that b"\\n" without polling; read_framed takes
        the next line alone again. Fix: as in the test above (the b"\\n" piece then polls
        and read_ready joins everything received behind it).
        """
        count = 20000
        lines = [b'data: {"choices":[{"delta":{"content":"t%05d"}}]}\n' % i for i in range(count)]
        data, sizes = self.burst(b"".join(chunk(line) + chunk(b"\n") for line in lines))
        self.assertEqual(data, b"".join(line + b"\n" for line in lines))
        lone_newlines = sizes.count(1)          # a b"\n" re-framed alone: one write each
        self.assertLess(lone_newlines, count // 10,
                        "%d blank lines written alone of %d" % (lone_newlines, count))

    def test_a_burst_of_line_chunks_with_extensions_is_coalesced(self):
        """Was a flaw: 50,000 chunks of one 16-byte NDJSON line each, with a chunk extension (so
        read_framed leaves them to read1), leave in ~17,500 writes (b55a019 and the fix: under
        a tenth).

        Cause: as above -- read1() returns one chunk per call however many are buffered, and
        a piece ending in b"\\n" is no longer followed by the read_ready() poll. Skipping the
        poll only for pieces of >= FRAMED_CHUNK_MIN bytes would still leave this case at one
        write per chunk. Fix: skip it only when the body is not chunked (`and not
        response.chunked`): there read1() already returned all that was buffered, while for
        a chunked body read_framed is now the fast path and read1 sees only odd chunks.
        """
        count = 50000
        lines = [b'{"n":%09d}\n' % i for i in range(count)]          # 16 bytes each
        data, sizes = self.burst(b"".join(chunk(line, b"10;x") for line in lines))
        self.assertEqual(data, b"".join(lines))
        self.assertLess(len(sizes), count // 10, "%d writes for %d chunks" % (len(sizes), count))

    def test_a_burst_of_one_byte_chunks_without_newlines_is_still_coalesced(self):
        count = 100000
        payload = bytes(65 + n % 26 for n in range(count))
        data, sizes = self.burst(b"".join(b"1\r\n%c\r\n" % c for c in payload))
        self.assertEqual(data, payload)
        self.assertLess(len(sizes), count // 10)

    def test_a_burst_of_framed_chunks_leaves_in_few_writes(self):
        # Chunks of FRAMED_CHUNK_MIN bytes pass on framed: every whole chunk a recv brought
        # goes in one write (a chunk cut by the read buffer's end is decoded and joined).
        # The relay loop writes once per piece BodyPipe.read() gives: those are counted.
        count = 20000
        events = [b"data: %08d\n\n" % i for i in range(count)]    # 16 bytes each
        pieces = []
        real = proxy.BodyPipe.read

        def counting(pipe):
            data = real(pipe)
            pieces.append(len(data))
            return data
        proxy.BodyPipe.read = counting
        self.addCleanup(setattr, proxy.BodyPipe, "read", real)
        data, sizes = self.burst(b"".join(chunk(e) for e in events))
        self.assertEqual(data, b"".join(events))
        self.assertLess(len(pieces), count // 10, "%d writes for %d chunks" % (len(pieces), count))

if __name__ == "__main__":
    unittest.main()
