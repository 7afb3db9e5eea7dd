"""Issue 16's syscall shortcuts in the relay, attacked as a hostile backend and client would.

1. The relay writes to a non-blocking client socket from a body's second piece on
   (send_all_nonblocking) and puts the timeout back in a ``finally``.
2. _ReadFirst reads the backend socket at once when bytes are likely there.
3. Late bytes: at a response's end only its buffer is looked at; bytes still in the socket
   are found by UpstreamPool.acquire()'s check before every reuse.

Every backend is a raw socket script (test_hostile.ScriptedBackend). Tests wait on
conditions (the backend's or the test's events), never on sleeps.

Run: python3 tests/run.py test_relay_attacks
"""

import io
import os
import socket
import ssl
import threading
import time
import unittest

from support import proxy, https, settled_stats, tls_socket, wait_until, certs_dir, client_context
from test_hostile import ScriptedBackend, LogCapture, start_quiet_proxy
from test_hostile_relay import parse_chunked, read_reply
from test_framing import SECRET, answer, get, path_of


class LateBytesReachNoOtherClientTests(unittest.TestCase):
    """Bytes past a response's end, however they arrive, never become another client's answer."""

    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port)
        self.logs = LogCapture(self)
        self.late_sent = threading.Event()

    def first_then_second(self, first: bytes, then_close: bool):
        """/first gets ``first``; once the proxy has finished that request, the backend sends
        SECRET on the same connection (and closes it, with then_close)."""
        finished = threading.Event()

        def behaviour(backend, sock, request, n):
            if path_of(request) == b"/first":
                sock.sendall(first)
                finished.wait(10)       # the proxy has released the connection to the pool
                sock.sendall(SECRET)
                self.late_sent.set()
                return not then_close
            sock.sendall(answer(b"answer for " + path_of(request)))
            return True
        self.backend.behaviour = behaviour
        conn = https(self.proxy)
        self.addCleanup(conn.close)
        conn.request("GET", "/first")
        response = conn.getresponse()
        body = response.read()
        self.assertTrue(wait_until(lambda: settled_stats(self.proxy)["requests"] == 1))
        finished.set()
        self.assertTrue(self.late_sent.wait(5))
        self.assertEqual(get(self.proxy, "/second"), (200, b"answer for /second"))
        self.assertEqual(self.backend.connections, 2, "a connection with late bytes was reused")
        return body

    def test_late_bytes_then_the_backends_close(self):
        # acquire(): readable, and not only the close (data first): dropped and said so.
        self.assertEqual(self.first_then_second(answer(b"hello"), then_close=True), b"hello")
        self.assertIn("past the end of its response", self.logs.text.getvalue())

    def test_late_bytes_after_a_chunked_body_passed_on_as_framed(self):
        # The body's chunks go through read_framed (>= FRAMED_CHUNK_MIN), the last through
        # read1(): the late bytes come in a later segment, so only acquire() can see them.
        data = b"x" * 100
        first = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n"
                 + (b"%x\r\n%s\r\n" % (len(data), data)) * 3 + b"0\r\n\r\n")
        self.assertEqual(self.first_then_second(first, then_close=False), data * 3)
        self.assertIn("past the end of its response", self.logs.text.getvalue())

    def test_late_bytes_behind_framed_chunks_in_the_same_segment(self):
        # Only the buffer is looked at now: the bytes behind the last chunk are there.
        data = b"y" * 100
        response = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     + (b"%x\r\n%s\r\n" % (len(data), data)) * 3 + b"0\r\n\r\n" + SECRET)

        def behaviour(backend, sock, request, n):
            sock.sendall(response if path_of(request) == b"/first"
                         else answer(b"answer for " + path_of(request)))
            return True
        self.backend.behaviour = behaviour
        self.assertEqual(get(self.proxy, "/first"), (200, data * 3))
        self.assertEqual(get(self.proxy, "/second"), (200, b"answer for /second"))
        self.assertEqual(self.backend.connections, 2, "a connection with late bytes was reused")

    def test_late_bytes_after_a_trailer(self):
        first = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n")
        self.assertEqual(self.first_then_second(first, then_close=False), b"hello")


class ReadFirstNeverTruncatesTests(unittest.TestCase):
    """A read that filled the buffer is followed by one that tries the socket first: when the
    backend pauses right there, the proxy must wait for the rest, not end the body."""

    def setUp(self):
        self.backend = ScriptedBackend(self)
        self.proxy = start_quiet_proxy(self, self.backend.port)

    def paused_body(self, head: bytes, first: bytes, rest: bytes):
        go = threading.Event()

        def behaviour(backend, sock, request, n):
            sock.sendall(head + first)
            go.wait(10)
            sock.sendall(rest)
            return True
        self.backend.behaviour = behaviour
        sock = tls_socket(self.proxy, timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b"GET /v1/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        got = b""
        while len(got) < len(first) // 2:          # the proxy is inside the body now
            got += sock.recv(1 << 20)
        go.set()
        return sock, got

    def test_a_content_length_body_paused_after_exactly_read_chunk_bytes(self):
        size = proxy.READ_CHUNK
        first, rest = b"a" * size, b"b" * 1000
        sock, got = self.paused_body(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (size + len(rest)), first, rest)
        while not got.endswith(rest):
            piece = sock.recv(1 << 20)
            self.assertTrue(piece, "the body was cut short")
            got += piece
        self.assertEqual(got.partition(b"\r\n\r\n")[2], first + rest)
        stats = settled_stats(self.proxy)
        self.assertEqual((stats["requests"], stats["errors"]), (1, 0))

    def test_a_chunk_paused_after_a_full_buffer(self):
        size = 3 * io.DEFAULT_BUFFER_SIZE
        first = b"%x\r\n" % (2 * size) + b"c" * size
        rest = b"d" * size + b"\r\n0\r\n\r\n"
        sock, got = self.paused_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                     first, rest)
        while True:
            body = got.partition(b"\r\n\r\n")[2]
            complete, data, _, after = parse_chunked(body)
            if complete:
                break
            piece = sock.recv(1 << 20)
            self.assertTrue(piece, "the body was cut short")
            got += piece
        self.assertEqual((data, after), (b"c" * size + b"d" * size, b""))
        stats = settled_stats(self.proxy)
        self.assertEqual((stats["requests"], stats["errors"]), (1, 0))

    def test_a_tls_socket_is_never_read_beneath_its_tls_layer(self):
        """Was a latent flaw: ssl.SSLSocket is a socket.socket, so a response over one got
        _ReadFirst, whose os.readv() would read ciphertext as HTTP. Backends are plain HTTP
        today (http:// only); the guard keeps it so if that ever changes."""
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        tls = client_context().wrap_socket(ours, server_hostname="localhost",
                                           do_handshake_on_connect=False)
        self.addCleanup(tls.close)
        tls.settimeout(5.0)
        response = proxy.UpstreamResponse(tls, method="GET")
        self.addCleanup(response.close)
        self.assertIsNot(type(response.fp.raw), proxy._ReadFirst)


class ClientSocketAfterTheStreamTests(unittest.TestCase):
    """Every way out of a streamed body leaves the client socket with its timeout back."""

    def test_an_idle_keep_alive_connection_after_a_stream_waits_client_timeout(self):
        # Were the socket left non-blocking, the next head read would fail at once (TLS
        # "want read") and the connection close immediately; were it left without a timeout,
        # never.
        backend = ScriptedBackend(self)
        server = start_quiet_proxy(self, backend.port, client_timeout=1.0)
        got_first = threading.Event()

        def behaviour(backend, sock, request, n):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (40, b"e" * 40))
            got_first.wait(10)          # a second piece: the socket was made non-blocking
            sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (40, b"f" * 40))
            return True
        backend.behaviour = behaviour
        sock = tls_socket(server, timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while b"e" * 40 not in data:
            data += sock.recv(65536)
        got_first.set()
        while not parse_chunked(data.partition(b"\r\n\r\n")[2])[0]:
            data += sock.recv(65536)
        self.assertEqual(parse_chunked(data.partition(b"\r\n\r\n")[2])[1], b"e" * 40 + b"f" * 40)
        idle_from = time.monotonic()
        try:
            end = sock.recv(65536)
        except (ConnectionError, OSError):
            end = b""
        idle = time.monotonic() - idle_from
        self.assertEqual(end, b"")
        self.assertGreater(idle, 0.8, "the idle connection closed before clientTimeout")
        self.assertLess(idle, 5.0)

    def test_a_pipelined_request_behind_a_stream_is_answered_in_order(self):
        # The client's next request waits in the socket (and TLS) while the stream goes out
        # non-blocking; it is read, once the timeout is back, as the next request.
        backend = ScriptedBackend(self)
        server = start_quiet_proxy(self, backend.port)
        got_first = threading.Event()

        def behaviour(backend, sock, request, n):
            if path_of(request) == b"/v1/stream":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n28\r\n" + b"e" * 40 + b"\r\n")
                got_first.wait(10)
                sock.sendall(b"28\r\n" + b"f" * 40 + b"\r\n0\r\n\r\n")
            else:
                sock.sendall(answer(b"answer for " + path_of(request)))
            return True
        backend.behaviour = behaviour
        sock = tls_socket(server, timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\n\r\n"
                     b"GET /next HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while b"e" * 40 not in data:
            data += sock.recv(65536)
        got_first.set()
        while b"answer for /next" not in data:
            piece = sock.recv(65536)
            self.assertTrue(piece, "closed before the pipelined answer: %r" % data[-200:])
            data += piece
        head, _, rest = data.partition(b"\r\n\r\n")
        complete, body, _, after = parse_chunked(rest)
        self.assertEqual((complete, body), (True, b"e" * 40 + b"f" * 40))
        self.assertTrue(after.startswith(b"HTTP/1.1 200"), after[:80])
        self.assertTrue(after.endswith(b"\r\n\r\nanswer for /next"), after[-80:])


class _NeverWritable:
    """A TLS socket as send_all_nonblocking() sees it, whose every send() asks to read first
    (SSLWantReadError) while the client has bytes waiting unread: poll(POLLIN) says ready at
    once, every time. ``stop`` ends the test's spin (send() then fails)."""

    def __init__(self, sock):
        self.sock = sock
        self.sends = 0
        self.stop = threading.Event()

    def fileno(self):
        return self.sock.fileno()

    def send(self, data):
        self.sends += 1
        if self.stop.is_set():
            raise ConnectionResetError("test over")
        raise ssl.SSLWantReadError("The operation did not complete (read)")


class SendAllNonBlockingBoundTests(unittest.TestCase):

    def test_want_read_with_bytes_waiting_does_not_spin_past_the_timeout(self):
        """Was a flaw: each wait was bounded by the timeout, the whole send was not. When TLS
        asks to read while the client has sent bytes we do not read (a pipelined request),
        poll(POLLIN) returns at once and the loop spun at 100% CPU for ever."""
        ours, client = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(client.close)
        client.sendall(b"GET /next HTTP/1.1\r\n")            # waiting, never read
        fake = _NeverWritable(ours)
        self.addCleanup(fake.stop.set)
        outcome = []

        def run():
            try:
                proxy.send_all_nonblocking(fake, b"x" * 1000, 0, 0.3)
                outcome.append("returned")
            except Exception as exc:            # noqa: BLE001 - recorded for the assertion
                outcome.append(exc)
        thread = threading.Thread(target=run, daemon=True)
        started = time.monotonic()
        thread.start()
        thread.join(3.0)
        fake.stop.set()
        thread.join(5.0)
        self.assertTrue(outcome and isinstance(outcome[0], socket.timeout),
                        "no timeout after 3 s (%d sends): %r" % (fake.sends, outcome))
        self.assertLess(time.monotonic() - started, 2.9)

    def test_a_tls_client_draining_a_little_now_and_then_gets_one_timeout_per_piece(self):
        """Was a flaw: a piece sent to a blocking TLS socket had to leave within the client
        timeout (one deadline per SSL write); non-blocking, each wait for room had its own,
        so a client draining a few KB per (timeout - epsilon) held the thread, and the
        backend's generation, through a 256 KB piece for minutes instead of seconds."""
        server_raw, client_raw = socket.socketpair()
        for sock in (server_raw, client_raw):
            self.addCleanup(sock.close)
        server_raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client_raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(os.path.join(certs_dir(), "cert.pem"),
                                os.path.join(certs_dir(), "key.pem"))
        server = context.wrap_socket(server_raw, server_side=True, do_handshake_on_connect=False)
        client = client_context().wrap_socket(client_raw, server_hostname="localhost",
                                              do_handshake_on_connect=False)
        shaking = threading.Thread(target=client.do_handshake)
        shaking.start()
        server.do_handshake()
        shaking.join(5)
        stop = threading.Event()
        self.addCleanup(stop.set)

        def drip():                 # 4 KB every 0.1 s, for 3 s at most
            deadline = time.monotonic() + 3.0
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    client.recv(4096)
                except OSError:
                    return
                stop.wait(0.1)
        reader = threading.Thread(target=drip, daemon=True)
        reader.start()
        server.settimeout(0.0)
        started = time.monotonic()
        with self.assertRaises(socket.timeout):
            proxy.send_all_nonblocking(server, b"p" * proxy.READ_CHUNK, 0, 0.5)
        self.assertLess(time.monotonic() - started, 2.0, "the piece's deadline moved with each wait")
        stop.set()
        reader.join(5)


if __name__ == "__main__":
    unittest.main()
