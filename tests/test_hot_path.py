"""Tests for issue 16's streaming hot path: its shortcuts give exactly what the general path gives.

Every shortcut here (one whole SSE event per piece, the stripper's one-line edit, the relay's
direct send, no readiness poll after a piece that ends a line, a non-blocking client socket
from a body's second piece on) is checked against the general code it bypasses: the same
events, the same bytes to the client, the same usage, the same timeouts.

Run: python3 tests/run.py test_hot_path
"""

import hashlib
import io
import json
import random
import socket
import threading
import time
import unittest
from unittest import mock

from support import (proxy, received_while, small_buffer_socketpair, start_proxy,
                     start_upstream, tls_socket, wait_until)


def chunk_event(i, usage_null=True, crlf=False):
    payload = {"id": "c", "object": "chat.completion.chunk", "model": "m",
               "choices": [{"index": 0, "delta": {"content": " t%d" % i}}]}
    text = json.dumps(payload, separators=(",", ":"))
    if usage_null:
        text = text[:-1] + ',"usage":null}'
    end = "\r\n" if crlf else "\n"
    return ("data: " + text + end + end).encode()


def random_stream(rng, events=60):
    """An SSE stream mixing the hot path's shape with everything that must leave it."""
    parts = []
    for i in range(events):
        roll = rng.random()
        if roll < 0.6:
            parts.append(chunk_event(i))
        elif roll < 0.65:
            parts.append(chunk_event(i, crlf=True))
        elif roll < 0.7:
            parts.append(b": keep-alive\n\n")
        elif roll < 0.75:
            parts.append(b"event: message\n" + chunk_event(i))
        elif roll < 0.8:
            parts.append(b"id: %d\n" % i + chunk_event(i))
        elif roll < 0.85:
            parts.append(b'data: {"a":\ndata: 1,"usage":null}\n\n')    # two data lines
        elif roll < 0.9:
            parts.append(b"data:" + chunk_event(i)[6:])                # no space after colon
        elif roll < 0.93:
            parts.append(b"data: \n\n")
        elif roll < 0.96:
            parts.append(b'data: {"x":"\\"usage\\":null}","usage":null}\n\n')
        else:
            parts.append(chunk_event(i, usage_null=False))
    usage = {"prompt_tokens": 7, "completion_tokens": events, "total_tokens": 7 + events}
    parts.append(b'data: {"id":"c","model":"m","choices":[],"usage":%s}\n\n'
                 % json.dumps(usage).encode())
    parts.append(b"data: [DONE]\n\n")
    return parts


def cut(parts, rng, mode):
    """The stream's bytes in pieces: as sent (one event each), at random places, or bytewise."""
    whole = b"".join(parts)
    if mode == "events":
        return list(parts)
    if mode == "groups":             # a few whole events per piece, as when the proxy is behind
        pieces, pos = [], 0
        while pos < len(parts):
            step = rng.choice((1, 2, 3, 5))
            pieces.append(b"".join(parts[pos:pos + step]))
            pos += step
        return pieces
    if mode == "bytes":
        return [whole[i:i + 1] for i in range(len(whole))]
    pieces, pos = [], 0
    while pos < len(whole):
        step = rng.choice((1, 2, 7, 40, 200, 1000))
        pieces.append(whole[pos:pos + step])
        pos += step
    return pieces


class SseReaderShortcutTests(unittest.TestCase):
    """_UsageSseReader: a piece that is one whole event takes a shortcut; nothing else may."""

    def read(self, pieces, raw):
        events = []

        def on_event(name, payload, raw_lines):
            events.append((name, payload, b"".join(raw_lines) if raw_lines else None))
            if raw and b'"usage":null' in payload:
                return b"<edited>"
            return None

        reader = proxy._UsageSseReader(on_event, 1 << 20, raw=raw)
        out = []
        for piece in pieces:
            reader.feed(piece)
            out.append(reader.take_output())
        out.append(reader.finish())
        return events, b"".join(out), reader.lines

    def test_every_cut_of_a_mixed_stream_reads_the_same_events_and_bytes(self):
        for seed in range(40):
            rng = random.Random(seed)
            parts = random_stream(rng)
            for raw in (False, True):
                expected = self.read(cut(parts, rng, "bytes"), raw)
                for mode in ("events", "groups", "random"):
                    got = self.read(cut(parts, rng, mode), raw)
                    self.assertEqual(got[0], expected[0], (seed, raw, mode))
                    self.assertEqual(got[1], expected[1], (seed, raw, mode))
                    if mode == "events":
                        # The line count is the tap's work bound: the shortcut counts too.
                        self.assertEqual(got[2], b"".join(parts).count(b"\n"), (seed, raw))

    def test_the_shortcut_is_taken_only_between_events(self):
        taken = []
        reader = proxy._UsageSseReader(lambda *a: taken.append(a[1]), 1 << 20)
        reader.feed(b"data: {\"a\":1}\n\n")         # the first piece: the general path
        self.assertTrue(reader.at_boundary)
        reader.feed(b"event: ping\n")                # a pending event name...
        self.assertFalse(reader.at_boundary)
        reader.feed(b"data: {\"b\":2}\n\n")          # ...belongs to this event
        self.assertEqual(taken, [b'{"a":1}', b'{"b":2}'])
        self.assertTrue(reader.at_boundary)
        reader.feed(b"data: {\"c\"")                 # half a line
        self.assertFalse(reader.at_boundary)
        reader.feed(b":3}\n\n")
        self.assertEqual(taken[-1], b'{"c":3}')

    def test_an_over_long_event_still_counts_as_lost(self):
        taken = []
        reader = proxy._UsageSseReader(lambda *a: taken.append(a[1]), 64)
        reader.feed(b"data: {}\n\n")
        reader.feed(b"data: " + b"x" * 100 + b"\n\n")
        reader.feed(b"data: {\"ok\":1}\n\n")
        self.assertEqual(taken, [b"{}", b'{"ok":1}'])


class StripperShortcutTests(unittest.TestCase):
    """InjectedUsageStripper: the one-line edit equals the general edit, byte for byte."""

    def strip(self, pieces):
        stripper = proxy.InjectedUsageStripper()
        out = [stripper.feed(piece) for piece in pieces]
        out.append(stripper.finish())
        return b"".join(out)

    def test_stream_edits_are_the_same_however_the_stream_is_cut(self):
        for seed in range(40):
            rng = random.Random(seed)
            parts = random_stream(rng)
            expected = self.strip(cut(parts, rng, "bytes"))
            self.assertNotIn(b'}]},"usage":null}', expected)
            self.assertNotIn(b'"choices":[],"usage"', expected)
            for mode in ("events", "groups", "random"):
                self.assertEqual(self.strip(cut(parts, rng, mode)), expected, (seed, mode))

    def test_every_edited_event_is_json_without_usage(self):
        out = self.strip([chunk_event(i) for i in range(20)])
        events = [e for e in out.split(b"\n\n") if e]
        self.assertEqual(len(events), 20)
        for event in events:
            obj = json.loads(event[len(b"data: "):])
            self.assertNotIn("usage", obj)


class TapShortcutTests(unittest.TestCase):
    """UsageTap: the usage a stream reports is the same whichever way its bytes arrive."""

    def usage(self, pieces, injected):
        info = proxy.inspect_request("openai_chat", b'{"model":"m","stream":true}', True)
        tap = proxy.UsageTap("openai_chat", info, "text/event-stream", "", injected=injected)
        for piece in pieces:
            self.assertIs(tap.feed(piece), piece)
        return tap.finish(True)[1]

    def test_usage_and_model_do_not_depend_on_the_cut(self):
        for seed in range(20):
            rng = random.Random(seed)
            parts = random_stream(rng)
            for injected in (False, True):
                expected = self.usage(cut(parts, rng, "bytes"), injected)
                self.assertEqual(expected["completion"], 60)
                self.assertEqual(expected["model"], "m")
                for mode in ("events", "groups", "random"):
                    self.assertEqual(self.usage(cut(parts, rng, mode), injected), expected)


class RequestShortcutTests(unittest.TestCase):
    """inspect_request's JSON shortcut and inject_stream_usage's early return change nothing."""

    BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'

    def test_the_utf8_shortcut_parses_as_json_loads_does(self):
        bodies = [self.BODY, b" " + self.BODY + b"\n", b"\xef\xbb\xbf" + self.BODY,
                  self.BODY.decode().encode("utf-16"), self.BODY.decode().encode("utf-32"),
                  b'{"a":1} x', b'{"a":"\xff"}', b"[1,2]", b"", b"{", b'{"a":1}{"b":2}',
                  b'{"model":"\xc3\xa9"}', b'{"s":"\\ud800"}', b"\t{}\r\n"]
        for body in bodies:
            try:
                expected = json.loads(body)
            except ValueError:
                expected = None
            self.assertEqual(proxy._usage_loads_utf8(body), expected, body)

    def test_inject_gives_the_same_answer_with_or_without_the_request_info(self):
        variants = [self.BODY, self.BODY.replace(b"true", b"false"),
                    self.BODY.replace(b'"stream":true,', b""),
                    self.BODY[:-1] + b',"stream":false}', self.BODY[:-1] + b',"stream":true}',
                    self.BODY[:-1] + b',"stream_options":{"include_usage":true}}',
                    self.BODY[:-1] + b',"stream_options":null}', b'{"stream":true', b"[]"]
        for body in variants:
            info = proxy.inspect_request("openai_chat", body, True)
            self.assertEqual(proxy.inject_stream_usage("openai_chat", body, info),
                             proxy.inject_stream_usage("openai_chat", body, None), body)


class SendAllTests(unittest.TestCase):
    """send_all() and send_all_nonblocking() write every byte, also when the kernel takes a
    piece in several sends (and, non-blocking, has no room for a while)."""

    DATA = bytes(range(256)) * 4096          # 1 MiB, far more than one send takes

    def test_a_large_piece_arrives_whole_over_a_small_socket_buffer(self):
        left, right = small_buffer_socketpair(self)
        self.assertEqual(received_while(right, len(self.DATA),
                                        lambda: proxy.send_all(left, self.DATA)), self.DATA)

    def test_nonblocking_every_byte_arrives_and_a_stuck_reader_times_out(self):
        left, right = small_buffer_socketpair(self)
        left.settimeout(0.0)
        self.assertEqual(received_while(
            right, len(self.DATA), lambda: proxy.send_all_nonblocking(left, self.DATA, 0, 10.0)),
            self.DATA)
        started = time.monotonic()
        with self.assertRaises(socket.timeout):
            proxy.send_all_nonblocking(left, self.DATA, 0, 0.3)     # nobody reads any more
        self.assertGreater(time.monotonic() - started, 0.25)


def _streaming_backend(pieces, size):
    """A responder that sends ``pieces`` chunks of ``size`` bytes as fast as it can; each
    chunk's bytes depend on its number, so a lost, doubled or reordered piece shows."""
    sent = {"all": hashlib.sha256(), "broke": None}

    def respond(handler, request):
        handler.start_chunked()
        try:
            for i in range(pieces):
                data = (b"%08d" % i) * (size // 8)
                handler.send_chunk(data)
                sent["all"].update(data)
            handler.end_chunked()
        except OSError:
            sent["broke"] = time.monotonic()
            raise
    return respond, sent


def _read_chunked_slowly(sock, pause_every=0):
    """Read one chunked response from a raw TLS socket; returns (head, sha256 of the body
    data, complete). Sleeps a moment every ``pause_every`` bytes, in which the proxy fills the
    client's buffers. (A small SO_RCVBUF would too, but with delayed ACKs it reads a few
    hundred KB a second, and the connection's idle timeout ends before the next request.)"""
    state = {"buf": b"", "since_pause": 0}

    def receive_until(enough):
        while not enough(state["buf"]):
            piece = sock.recv(65536)
            if not piece:
                raise EOFError
            state["buf"] += piece
            state["since_pause"] += len(piece)
            if pause_every and state["since_pause"] > pause_every:
                state["since_pause"] = 0
                time.sleep(0.05)

    head, digest = b"", hashlib.sha256()
    try:
        receive_until(lambda buf: b"\r\n\r\n" in buf)
        head, state["buf"] = state["buf"].split(b"\r\n\r\n", 1)
        while True:
            receive_until(lambda buf: b"\r\n" in buf)
            line, state["buf"] = state["buf"].split(b"\r\n", 1)
            size = int(line, 16)
            receive_until(lambda buf: len(buf) >= size + 2)
            digest.update(state["buf"][:size])
            state["buf"] = state["buf"][size + 2:]
            if size == 0:
                return head, digest, state["buf"] == b""
    except EOFError:
        return head, digest, False


class NonBlockingClientWritesTests(unittest.TestCase):
    """From a body's second piece on, the relay writes to a non-blocking client socket and
    waits only when it is full (send_all_nonblocking): no byte may be lost or doubled when TLS
    says "would block", a client that stops reading is still dropped after clientTimeout, and
    the connection serves its next request as before."""

    def test_a_fast_stream_to_a_slow_reader_arrives_whole_and_the_connection_goes_on(self):
        respond, sent = _streaming_backend(pieces=300, size=40000)     # 12 MB
        upstream = start_upstream(self, respond)
        server = start_proxy(self, upstream.server_address[1])
        waits = []
        real = proxy.send_all_nonblocking

        def counting(sock, data, done, timeout):
            waits.append(len(data) - done)
            return real(sock, data, done, timeout)
        sock = tls_socket(server, timeout=30)
        self.addCleanup(sock.close)
        # A receive window well below the 12 MB, whatever the kernel's autotuning allows
        # (large enough not to crawl under delayed ACKs).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        with mock.patch.object(proxy, "send_all_nonblocking", counting):
            sock.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head, digest, complete = _read_chunked_slowly(sock, pause_every=1 << 20)
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
        self.assertTrue(complete, "the stream did not end cleanly")
        self.assertEqual(digest.hexdigest(), sent["all"].hexdigest())
        self.assertTrue(waits, "the client's buffers never filled: the test proves nothing")
        # The same connection, its socket blocking again, answers the next request.
        sock.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, digest, complete = _read_chunked_slowly(sock)
        self.assertTrue(head.startswith(b"HTTP/1.1 200") and complete, head)

    def test_a_client_that_stops_reading_mid_stream_is_dropped_after_client_timeout(self):
        respond, sent = _streaming_backend(pieces=100000, size=16000)  # 1.6 GB: never ends
        upstream = start_upstream(self, respond)
        server = start_proxy(self, upstream.server_address[1], client_timeout=1.0)
        sock = tls_socket(server, timeout=30)
        self.addCleanup(sock.close)
        sock.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 200"))
        stopped = time.monotonic()            # and reads nothing more
        # The proxy fills the client's buffers, waits clientTimeout for room, then closes the
        # backend connection: the backend's next send fails.
        self.assertTrue(wait_until(lambda: sent["broke"] is not None, 20),
                        "the proxy waited for the stuck client longer than clientTimeout")
        self.assertGreater(sent["broke"] - stopped, 0.9, "dropped before clientTimeout")


class ReadFirstTests(unittest.TestCase):
    """The backend's socket is read at once when bytes are likely there (_ReadFirst), and
    otherwise waits as a socket with a timeout does: a slow or silent backend, a body that
    fills the buffer exactly, and the late-bytes check behave as they did with SocketIO."""

    def response_over(self, timeout):
        ours, backend = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(backend.close)
        ours.settimeout(timeout)
        response = proxy.UpstreamResponse(ours, method="GET")
        self.addCleanup(response.close)
        self.assertIs(type(response.fp.raw), proxy._ReadFirst)
        return response, backend

    def test_a_head_that_arrives_in_parts_is_waited_for(self):
        response, backend = self.response_over(5.0)
        backend.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
        later = threading.Timer(0.2, backend.sendall, (b"ngth: 2\r\n\r\nok",))
        later.start()
        self.addCleanup(later.cancel)
        response.begin()
        self.assertEqual((response.status, response.read()), (200, b"ok"))

    def test_a_silent_backend_times_out_as_before(self):
        response, backend = self.response_over(0.3)
        started = time.monotonic()
        with self.assertRaises(socket.timeout):
            response.begin()
        self.assertGreater(time.monotonic() - started, 0.25)

    def test_a_read_that_fills_the_buffer_then_a_stall_times_out(self):
        # After a full read the next one tries the socket first and finds nothing: it must
        # wait (and time out), not report "would block" or an end.
        response, backend = self.response_over(0.3)
        size = 3 * io.DEFAULT_BUFFER_SIZE
        backend.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (size + 10))
        backend.sendall(b"x" * size)
        response.begin()
        got = b""
        with self.assertRaises(socket.timeout):
            while True:
                piece = response.read1(65536)
                self.assertTrue(piece, "a stall was read as the end of the body")
                got += piece
        self.assertEqual(got, b"x" * size)

    def test_late_bytes_are_found_without_waiting(self):
        for late, overran in ((b"", False), (b"HTTP/1.1 200 OK\r\n", True)):
            response, backend = self.response_over(5.0)
            backend.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + late)
            response.begin()
            self.assertEqual(response.read(2), b"ok")
            started = time.monotonic()
            response.close()
            self.assertLess(time.monotonic() - started, 1.0, "the late-bytes check waited")
            self.assertEqual(response.overran, overran, late)
            self.assertEqual(response.reusable(), not overran)


if __name__ == "__main__":
    unittest.main()
