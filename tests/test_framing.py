"""Response framing against hostile and buggy backends (issue 11, items 1-4, 13, 14).

One client's answer must never reach another client: the proxy pools backend connections, so
any disagreement about where a response ends (an interim 1xx taken for the final answer, bytes
past the end, a header line read two ways) would hand the rest of one exchange to the next.
Each backend here is a raw socket script (test_hostile.ScriptedBackend) on 127.0.0.1.
"""

import gzip
import http.client
import json
import select
import socket
import ssl
import threading
import time
import unittest

from support import proxy, https, start_upstream, settled_stats, tls_socket, wait_until
from test_hostile import ScriptedBackend, LogCapture, raw_exchange, start_quiet_proxy, answer_ok


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n%sContent-Length: %d\r\n\r\n%s"
            % (extra, len(body), body))


def path_of(request) -> bytes:
    return request[0].split(b" ", 2)[1]


def wait_for_more_or_go(backend, sock, limit=10.0) -> None:
    """Block until the proxy sends more on this connection (or closes it), or the test says go."""
    deadline = time.monotonic() + limit
    while not backend.go.is_set() and not backend.release.is_set() and time.monotonic() < deadline:
        if select.select([sock], [], [], 0.02)[0]:
            return


def get(server, path, method="GET", headers=None):
    conn = https(server)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


SECRET = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 20\r\n\r\nfirst user's secret!"


class InterimResponseTests(unittest.TestCase):
    """Item 1: a 1xx before the final answer is read past; an unasked 101 is a broken exchange."""

    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port)
        self.hinted = threading.Event()

    def test_early_hints_never_hand_the_first_answer_to_the_next_client(self):
        def behaviour(backend, sock, request, n):
            if path_of(request) == b"/first":
                sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
                self.hinted.set()
                # The model thinks; meanwhile another client's request may arrive on this very
                # connection if the proxy wrongly pooled it after the 103.
                wait_for_more_or_go(backend, sock)
                sock.sendall(answer(b"first user's secret!"))
                return True
            sock.sendall(answer(b"answer for " + path_of(request)))
            return True
        self.backend.behaviour = behaviour
        first = https(self.proxy)
        self.addCleanup(first.close)
        first.request("GET", "/first")
        self.assertTrue(self.hinted.wait(5))
        self.assertEqual(get(self.proxy, "/second"), (200, b"answer for /second"))
        self.backend.go.set()
        response = first.getresponse()
        self.assertEqual((response.status, response.read()), (200, b"first user's secret!"))

    def test_every_interim_answer_is_dropped_and_the_connection_stays_in_step(self):
        def behaviour(backend, sock, request, n):
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n"
                         b"HTTP/1.1 102 Processing\r\n\r\n"
                         b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\n"
                         b"HTTP/1.1 199 Whatever\r\nX-Note: x\r\n\r\n" + answer(b"final %d" % n))
            return True
        self.backend.behaviour = behaviour
        reply, _ = raw_exchange(self.proxy, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"
                                b"Connection: close\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply)
        self.assertNotIn(b"Early Hints", reply)
        self.assertNotIn(b"Link:", reply)
        self.assertTrue(reply.endswith(b"\r\n\r\nfinal 1"), reply)
        # The exchange ended cleanly at its boundary: the connection is reused.
        self.assertEqual(get(self.proxy, "/again"), (200, b"final 2"))
        self.assertEqual(self.backend.connections, 1)

    def test_too_many_interim_answers_give_502(self):
        def behaviour(backend, sock, request, n):
            sock.sendall(b"HTTP/1.1 102 Processing\r\n\r\n" * (proxy.MAX_INTERIM_RESPONSES + 1)
                         + answer(b"late"))
            return True
        self.backend.behaviour = behaviour
        status, body = get(self.proxy, "/v1/models")
        self.assertEqual(status, 502, body)
        self.assertIn(b"interim", body)

    def test_an_unasked_switch_to_another_protocol_gives_502_and_closes_the_connection(self):
        def behaviour(backend, sock, request, n):
            if len(backend.requests) == 1:
                sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: websocket\r\n\r\n" + SECRET)
                return True        # read on: the proxy's close ends this connection
            return answer_ok(backend, sock, request, n)
        self.backend.behaviour = behaviour
        status, body = get(self.proxy, "/v1/models")
        self.assertEqual(status, 502, body)
        self.assertIn(b"101", body)
        self.assertTrue(wait_until(lambda: len(self.backend.ended) == 1),
                        "the proxy kept the switched connection open")
        status, body = get(self.proxy, "/v1/models")
        self.assertEqual((status, body), (200, b'{"ok":true,"n":1}'))
        self.assertEqual(self.backend.connections, 2)


class LateBytesTests(unittest.TestCase):
    """Item 2: bytes after a complete response never become the next client's answer."""

    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port)
        self.logs = LogCapture(self)

    def late_body_after(self, head: bytes, method: str):
        """The backend answers `head` and sends the body it announced only once the next
        request arrives on the same connection (or the proxy closes it)."""
        def behaviour(backend, sock, request, n):
            if path_of(request) == b"/first":
                sock.sendall(head)
                wait_for_more_or_go(backend, sock)
                sock.sendall(SECRET)
                return True
            sock.sendall(answer(b"answer for " + path_of(request)))
            return True
        self.backend.behaviour = behaviour
        conn = https(self.proxy)
        self.addCleanup(conn.close)
        conn.request(method, "/first")
        response = conn.getresponse()
        self.assertEqual(response.read(), b"")
        wait_until(lambda: settled_stats(self.proxy)["requests"] == 1)
        self.assertEqual(get(self.proxy, "/second"), (200, b"answer for /second"))

    def test_a_body_after_a_head_answer_never_reaches_the_next_client(self):
        self.late_body_after(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(SECRET), "HEAD")

    def test_a_body_after_204_never_reaches_the_next_client(self):
        self.late_body_after(b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n"
                             % len(SECRET), "DELETE")

    def test_a_chunked_body_after_304_never_reaches_the_next_client(self):
        self.late_body_after(b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                             "GET")

    def assert_extra_bytes_discard_the_connection(self, response: bytes):
        def behaviour(backend, sock, request, n):
            if path_of(request) == b"/first":
                sock.sendall(response)
            else:
                sock.sendall(answer(b"answer for " + path_of(request)))
            return True
        self.backend.behaviour = behaviour
        self.assertEqual(get(self.proxy, "/first"), (200, b"hello"))
        self.assertEqual(get(self.proxy, "/second"), (200, b"answer for /second"))
        self.assertEqual(self.backend.connections, 2, "a connection with unread bytes was reused")
        self.assertIn("past the end of its response", self.logs.text.getvalue())

    def test_more_bytes_than_content_length_discard_the_connection(self):
        self.assert_extra_bytes_discard_the_connection(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + SECRET)

    def test_bytes_after_the_last_chunk_discard_the_connection(self):
        self.assert_extra_bytes_discard_the_connection(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + SECRET)

    def test_bytes_arriving_after_the_response_discard_the_connection(self):
        # Not in the recv that ended the response (as above) but in the socket a moment later:
        # found by the check every pooled connection passes before its reuse.
        late_sent = threading.Event()

        def behaviour(backend, sock, request, n):
            if path_of(request) == b"/first":
                sock.sendall(answer(b"hello"))
                time.sleep(0.1)                 # the proxy has released the connection by then
                sock.sendall(SECRET)
                late_sent.set()
            else:
                sock.sendall(answer(b"answer for " + path_of(request)))
            return True
        self.backend.behaviour = behaviour
        self.assertEqual(get(self.proxy, "/first"), (200, b"hello"))
        self.assertTrue(late_sent.wait(5), "the backend never sent its late bytes")
        self.assertEqual(get(self.proxy, "/second"), (200, b"answer for /second"))
        self.assertEqual(self.backend.connections, 2, "a connection with unread bytes was reused")
        self.assertIn("past the end of its response", self.logs.text.getvalue())

    def test_a_clean_head_answer_keeps_the_connection(self):
        def behaviour(backend, sock, request, n):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" if n == 1
                         else answer(b"answer %d" % n))
            return True
        self.backend.behaviour = behaviour
        self.assertEqual(get(self.proxy, "/first", method="HEAD"), (200, b""))
        self.assertEqual(get(self.proxy, "/second"), (200, b"answer 2"))
        self.assertEqual(self.backend.connections, 1)


class BackendHeaderTests(unittest.TestCase):
    """Item 3: a malformed backend head gets 502 and its connection closed, never relayed."""

    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port)

    def assert_refused(self, head: bytes, body: bytes = b"hello", close: bool = False):
        ended = len(self.backend.ended)

        def behaviour(backend, sock, request, n):
            sock.sendall(head + body)
            return not close     # keep reading: only the proxy's close ends the connection
        self.backend.behaviour = behaviour
        reply, closed = raw_exchange(self.proxy, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n"
                                     b"Connection: close\r\n\r\n", timeout=5)
        self.assertTrue(reply.startswith(b"HTTP/1.1 502 "), (head, reply))
        self.assertTrue(closed)
        self.assertNotIn(b"evil", reply)
        self.assertNotIn(b"hello", reply)
        self.assertTrue(wait_until(lambda: len(self.backend.ended) == ended + 1),
                        "the backend connection was kept: %r" % head)
        return reply

    def test_content_length_must_be_digits(self):
        for value in (b"+5", b"0_5", b"-5", b"5x", b"0x5", b"\xa05", b"\xb9", b"5, 6", b"9" * 19):
            with self.subTest(value=value):
                reply = self.assert_refused(b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\n" % value)
                self.assertIn(b"Content-Length", reply)

    def test_control_characters_in_values_are_refused(self):
        for value in (b"a\rSet-Cookie: evil=1", b"a\x00evil", b"a\x01evil", b"a\x7fevil",
                      b"a\x0bevil", b"a\x1bevil"):
            with self.subTest(value=value):
                self.assert_refused(b"HTTP/1.1 200 OK\r\nX-A: %s\r\nContent-Length: 5\r\n\r\n"
                                    % value)

    def test_malformed_header_lines_are_refused(self):
        for line in (b"Bad Name: evil", b"X-A : evil", b"X(a): evil", b"no colon evil",
                     b": evil", b"X-\xe9: evil", b" X-Folded-First: evil", b"X-A: a\r\n \t"):
            with self.subTest(line=line):
                self.assert_refused(b"HTTP/1.1 200 OK\r\n%s\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    % line, b"5\r\nhello\r\n0\r\n\r\n")

    def test_odd_transfer_encodings_are_refused(self):
        for value in (b"gzip, chunked", b"chunked, chunked", b"identity", b"chunked;q=1",
                      b"xchunked"):
            with self.subTest(value=value):
                self.assert_refused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n" % value,
                                    b"5\r\nhello\r\n0\r\n\r\n")

    def test_malformed_status_lines_and_cut_heads_are_refused(self):
        for head in (b"HTTP/1.1 600 Odd\r\nContent-Length: 5\r\n\r\n",
                     b"HTTP/1.1  200 OK\r\nContent-Length: 5\r\n\r\n",
                     b"HTTP/1.1 200 O\x00K\r\nContent-Length: 5\r\n\r\n",
                     b"HTTP/1.1 200 OK\r\n" + b"X-Big: %s\r\n" % (b"b" * 60000) * 5
                     + b"Content-Length: 5\r\n\r\n"):
            with self.subTest(head=head):
                self.assert_refused(head)
        # The backend closes in the middle of its head: http.client takes the end of the stream
        # for the end of the head, and would then wait for a body that never comes.
        self.assert_refused(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", b"", close=True)

    def test_a_folded_line_and_a_bare_lf_head_still_pass(self):
        def behaviour(backend, sock, request, n):
            sock.sendall(b"HTTP/1.1 200 OK\nX-Note: a\n\tb\nContent-Length: 5\n\nhello")
            return True
        self.backend.behaviour = behaviour
        conn = https(self.proxy)
        self.addCleanup(conn.close)
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (200, b"hello"))
        self.assertEqual(response.getheader("X-Note"), "a b")

    def assert_body_aborted(self, body: bytes):
        def behaviour(backend, sock, request, n):
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
            return True
        self.backend.behaviour = behaviour
        ended = len(self.backend.ended)
        conn = https(self.proxy)
        self.addCleanup(conn.close)
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        with self.assertRaises((http.client.IncompleteRead, ConnectionError, ssl.SSLError)):
            response.read()
        self.assertTrue(wait_until(lambda: len(self.backend.ended) == ended + 1))

    def test_chunk_sizes_must_be_hex_digits(self):
        for size in (b"+5", b" 5", b"0x5", b"5_0", b"-0"):
            with self.subTest(size=size):
                self.assert_body_aborted(size + b"\r\nhello\r\n0\r\n\r\n")

    def test_chunk_data_must_end_in_crlf(self):
        self.assert_body_aborted(b"5\r\nhelloXY0\r\n\r\n")


class UnderscoreHeaderTests(unittest.TestCase):
    """Item 4: WSGI/CGI backends read X_Forwarded_For as X-Forwarded-For: never forward it."""

    def test_request_headers_with_underscores_are_dropped(self):
        upstream = start_upstream(self)
        server = start_quiet_proxy(self, upstream.port)
        status, _ = get(server, "/v1/models", headers={
            "X_Forwarded_For": "6.6.6.6", "Content_Length": "99", "Transfer_Encoding": "chunked",
            "X_Real_IP": "6.6.6.6", "X-Kept": "yes"})
        self.assertEqual(status, 200)
        seen = upstream.requests[-1]
        self.assertEqual([n for n in seen.header_names() if "_" in n], [])
        self.assertEqual(seen.header("X-Kept"), "yes")
        self.assertEqual(seen.header("X-Forwarded-For"), "127.0.0.1")


if __name__ == "__main__":
    unittest.main()


HUGE = b"9" * 4300            # the most digits json.loads takes on Python 3.11+


class HugeNumberTests(unittest.TestCase):
    """Item 13: absurd token counts are clamped; the request is recorded, the client kept."""

    def exchange_twice(self, body: bytes, content_type: bytes, path: str):
        def behaviour(backend, sock, request, n):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                         % (content_type, len(body), body))
            return True
        backend = ScriptedBackend(self, behaviour)
        server = start_quiet_proxy(self, backend.port)
        logs = LogCapture(self)
        conn = https(server)
        self.addCleanup(conn.close)
        for _ in range(2):          # the same keep-alive client connection, twice
            conn.request("POST", path, body=b'{"model":"m","messages":[]}',
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            self.assertEqual((response.status, response.read()), (200, body))
        stats = settled_stats(server)
        self.assertEqual(stats["requests"], 2)
        self.assertEqual(logs.unexpected(), [])
        return stats

    def test_a_4300_digit_token_count_is_clamped_in_a_json_body(self):
        body = (b'{"model":"m","usage":{"prompt_tokens":%s,"completion_tokens":%s,'
                b'"total_tokens":%s}}' % (HUGE, HUGE, HUGE))
        stats = self.exchange_twice(body, b"application/json", "/v1/chat/completions")
        self.assertEqual(stats["tokens"]["prompt"], 0)
        self.assertEqual(stats["tokens"]["completion"], 0)

    def test_a_4300_digit_token_count_is_clamped_in_a_stream(self):
        body = (b'event: message_start\ndata: {"type":"message_start","message":{"model":"m",'
                b'"usage":{"input_tokens":7,"output_tokens":1}}}\n\n'
                b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":%s}}'
                b'\n\n' % HUGE)
        stats = self.exchange_twice(body, b"text/event-stream", "/v1/messages")
        self.assertEqual(stats["tokens"]["prompt"], 14)
        self.assertEqual(stats["tokens"]["completion"], 0)

    def test_the_stats_store_never_raises_on_huge_counts(self):
        store = proxy.StatsStore(enabled=False)
        store.record(proxy.RequestRecord(
            time=time.time(), method="POST", path="/v1/x", status=200, completion=True,
            model="m", usage_source="reported",
            usage={"prompt": int(HUGE), "completion": 10 ** 5000, "total": -1},
            ttfb_ms=1.0, duration_ms=900.0, bytes=10, streamed=True))
        snapshot = store.snapshot()
        self.assertEqual(snapshot["requests"], 1)
        json.dumps(snapshot)
        proxy.render_metrics(store)


def gzip_bomb_lines(line: bytes, decoded: int = 4 << 20) -> bytes:
    """About 4 KB of gzip that inflates to `decoded` bytes of `line` repeated."""
    return gzip.compress(line * (decoded // len(line)), 9)


def feed_tap(kind, content_type, body, encoding=None, piece=65536):
    tap = proxy.UsageTap(kind, None, content_type, encoding)
    started = time.thread_time()
    for start in range(0, len(body), piece):
        tap.feed(body[start:start + piece])
    _, usage = tap.finish(True)
    return tap, usage, time.thread_time() - started


class TapWorkBoundTests(unittest.TestCase):
    """Item 14: the usage tap's work per response is bounded; it gives up with "missing"."""

    def test_inflated_tiny_lines_give_up_quickly(self):
        # A legit compressed JSON body of the same decoded size costs one parse: the reference.
        numbers = json.dumps({"model": "m", "data": [{"embedding": [0.1234567] * 500000}],
                              "usage": {"prompt_tokens": 5, "total_tokens": 5}}).encode()
        _, usage, reference = feed_tap("openai_embeddings", "application/json",
                                       gzip.compress(numbers), "gzip")
        self.assertEqual(usage["source"], "reported")
        for kind, content_type, line in (
                ("openai_chat", "application/json", b"{}\n"),
                ("ollama_chat", "application/x-ndjson", b"{}\n"),
                ("ollama_chat", "application/x-ndjson", b'{"usage":{}}\n'),
                ("openai_chat", "text/event-stream", b"\n"),
                ("openai_chat", "text/event-stream", b'data: {"error":1}\n\n')):
            with self.subTest(content_type=content_type, line=line):
                body = gzip_bomb_lines(line)
                tap, usage, cost = feed_tap(kind, content_type, body, "gzip")
                self.assertTrue(tap.gave_up)
                self.assertEqual(usage["source"], "missing")
                # Bounded by the budget plus at most one inflated piece of lines.
                self.assertLess(tap._work, proxy.USAGE_WORK_BASE + len(body) // 8 + 70000)
                # Before the bound: 1.5 to 9 s of CPU here, 150 to 900 times the reference.
                self.assertLess(cost, 20 * reference + 0.2,
                                "%.3fs of parsing for %d bytes of gzip" % (cost, len(body)))

    def test_uncompressed_floods_are_bounded_too(self):
        body = b"a\n" * (2 << 20)
        tap, usage, _ = feed_tap("openai_chat", "text/event-stream", body)
        self.assertTrue(tap.gave_up)
        self.assertLess(tap._work, proxy.USAGE_WORK_BASE + len(body) // 8 + 70000)

    def test_real_long_streams_stay_within_the_bound(self):
        chunk = (b'data: {"id":"cmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
                 b'"choices":[{"index":0,"delta":{"content":" w"},"logprobs":null,'
                 b'"finish_reason":null}],"usage":{"prompt_tokens":10,"total_tokens":%d,'
                 b'"completion_tokens":%d}}\n\n')
        stream = b"".join(chunk % (10 + n, n) for n in range(1, 20001)) + b"data: [DONE]\n\n"
        tap, usage, _ = feed_tap("openai_chat", "text/event-stream", stream, piece=300)
        self.assertFalse(tap.gave_up)
        self.assertEqual((usage["source"], usage["completion"]), ("reported", 20000))
        anthropic = [b'event: message_start\ndata: {"type":"message_start","message":{"model":'
                     b'"m","usage":{"input_tokens":7,"output_tokens":1}}}\n\n']
        anthropic += [b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                      b'"delta":{"type":"text_delta","text":"w"}}\n\n'] * 50000
        anthropic += [b'event: message_delta\ndata: {"type":"message_delta","usage":'
                      b'{"output_tokens":50000}}\n\n']
        tap, usage, _ = feed_tap("anthropic_messages", "text/event-stream", b"".join(anthropic),
                                 piece=100)
        self.assertEqual((usage["source"], usage["completion"]), ("reported", 50000))

    def test_a_gzip_bomb_through_the_proxy_reaches_the_client_intact_with_usage_missing(self):
        body = gzip_bomb_lines(b"{}\n")

        def behaviour(backend, sock, request, n):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                         b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            return True
        backend = ScriptedBackend(self, behaviour)
        server = start_quiet_proxy(self, backend.port)
        logs = LogCapture(self)
        conn = https(server)
        self.addCleanup(conn.close)
        conn.request("POST", "/api/chat", body=b'{"model":"m","messages":[]}')
        response = conn.getresponse()
        self.assertEqual((response.status, response.read()), (200, body))
        stats = settled_stats(server)
        self.assertEqual(stats["recent"][0]["usage"], "missing")
        self.assertEqual(stats["requests"], 1)
        self.assertIn("giving up on this response", logs.text.getvalue())


class TinyChunkTests(unittest.TestCase):
    """Item 14: tiny chunks already received leave together; nothing waits for more."""

    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port)

    def test_a_burst_of_one_byte_chunks_is_coalesced(self):
        count = 100000
        payload = bytes(65 + n % 26 for n in range(count))

        def behaviour(backend, sock, request, n):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         + b"".join(b"1\r\n%c\r\n" % c for c in payload) + b"0\r\n\r\n")
            return True
        self.backend.behaviour = behaviour
        sock = tls_socket(self.proxy, 30)
        self.addCleanup(sock.close)
        sock.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        reply = b""
        while True:
            piece = sock.recv(1 << 20)
            if not piece:
                break
            reply += piece
        head, _, body = reply.partition(b"\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", head)
        decoded, rest = b"", body
        pieces = 0
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if not size:
                break
            decoded += rest[:size]
            rest = rest[size + 2:]
            pieces += 1
        self.assertEqual(decoded, payload)
        # One write per chunk sends 100,000 pieces; already-received chunks go out together.
        self.assertLess(pieces, count // 10, "%d pieces for %d chunks" % (pieces, count))

    def test_bytes_already_here_are_never_held_back_for_more(self):
        arrived = threading.Event()
        whole = b"\r\n3;x=1\r\nabc\r\n"
        for cut in (0, 2, 3, 7, 8, 9, 11):
            tail = whole[:cut]
            with self.subTest(tail=tail):
                arrived.clear()

                def behaviour(backend, sock, request, n):
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n1\r\nd\r\n5\r\nhello" + tail)
                    self.assertTrue(arrived.wait(10))        # only once the client has it all
                    sock.sendall(whole[len(tail):] + b"0\r\n\r\n")
                    return True
                self.backend.behaviour = behaviour
                conn = https(self.proxy)
                self.addCleanup(conn.close)
                conn.request("GET", "/v1/stream")
                response = conn.getresponse()
                expected = b"dhello" + (b"ab" if tail.endswith(b"ab") else b"")
                received = b""
                while len(received) < len(expected):
                    piece = response.read1(1024)
                    self.assertTrue(piece)
                    received += piece
                self.assertEqual(received, expected)
                arrived.set()
                self.assertEqual(received + response.read(), b"dhelloabc")
                conn.close()
