"""The forwarding core, Go ReverseProxy-style: real backend, real proxy, real TLS, real clients."""

import http.client
import json
import os
import socket
import ssl
import threading
import time
import unittest

from support import (start_upstream, start_proxy, https, tls_socket, read_http_response,
                     wait_until, echo_responder, client_context, settled_stats)


def request(server, method, target, body=None, headers=None, timeout=10.0):
    conn = https(server, timeout)
    conn.request(method, target, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def one_shot_backend(test, answer: bytes) -> int:
    """A raw backend that reads one request, sends `answer` as is, and closes. Returns its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    test.addCleanup(listener.close)

    def serve_once():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(answer)
        conn.close()
    threading.Thread(target=serve_once, daemon=True).start()
    return listener.getsockname()[1]


class HeaderTests(unittest.TestCase):
    def setUp(self):
        self.upstream = start_upstream(self)
        self.proxy = start_proxy(self, self.upstream.port)

    def test_hop_by_hop_request_headers_are_removed(self):
        response, _ = request(self.proxy, "GET", "/api/tags", headers={
            "Connection": "keep-alive, X-Hop-Token",
            "X-Hop-Token": "secret-hop",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic eDp5",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "Upgrade": "h2c",
            "X-Kept": "yes",
        })
        self.assertEqual(response.status, 200)
        seen = self.upstream.requests[-1]
        for name in ("x-hop-token", "keep-alive", "proxy-authorization", "proxy-connection",
                     "te", "upgrade"):
            self.assertNotIn(name, seen.header_names())
        self.assertEqual(seen.header("X-Kept"), "yes")

    def test_forwarded_headers_are_appended_and_host_is_the_target(self):
        request(self.proxy, "GET", "/api/tags", headers={"X-Forwarded-For": "10.1.2.3"})
        seen = self.upstream.requests[-1]
        self.assertEqual(seen.header("X-Forwarded-For"), "10.1.2.3, 127.0.0.1")
        self.assertEqual(seen.header("X-Forwarded-Proto"), "https")
        self.assertEqual(seen.header("X-Forwarded-Host"),
                         "localhost:%d" % self.proxy.server_address[1])
        self.assertEqual(seen.header("Host"), "127.0.0.1:%d" % self.upstream.port)

    def test_hop_by_hop_response_headers_are_removed(self):
        def responder(handler, request):
            body = b"{}"
            handler.send_response(200)
            handler.send_header("Connection", "X-Up-Hop")
            handler.send_header("X-Up-Hop", "1")
            handler.send_header("Keep-Alive", "timeout=5")
            handler.send_header("Upgrade", "h2c")
            handler.send_header("X-Request-Id", "req_123")
            handler.send_header("Access-Control-Allow-Origin", "http://backend.example")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        self.upstream.responder = responder
        response, data = request(self.proxy, "GET", "/x",
                                 headers={"Origin": "https://studio.example"})
        self.assertEqual(data, b"{}")
        self.assertIsNone(response.getheader("X-Up-Hop"))
        self.assertIsNone(response.getheader("Keep-Alive"))
        self.assertIsNone(response.getheader("Upgrade"))
        self.assertEqual(response.getheader("X-Request-Id"), "req_123")
        # The backend's own CORS header is replaced by ours, never duplicated.
        self.assertEqual(response.msg.get_all("Access-Control-Allow-Origin"),
                         ["https://studio.example"])
        self.assertIn("X-Request-Id", response.getheader("Access-Control-Expose-Headers"))


class BodyAndMethodTests(unittest.TestCase):
    def setUp(self):
        self.upstream = start_upstream(self)
        self.proxy = start_proxy(self, self.upstream.port)

    def test_every_method_path_and_query_arrive_byte_for_byte(self):
        target = "/v1/a%2Fb/%7Ec?x=%20y&z=1&z=2&empty="
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            body = b'{"m": "%s"}' % method.encode() if method != "GET" else None
            response, _ = request(self.proxy, method, target, body=body)
            self.assertEqual(response.status, 200, method)
            seen = self.upstream.requests[-1]
            self.assertEqual((seen.method, seen.path), (method, target))
            self.assertEqual(seen.body, body or b"")

    def test_one_mebibyte_body_arrives_intact(self):
        body = os.urandom(1024 * 1024)
        response, _ = request(self.proxy, "POST", "/upload", body=body,
                              headers={"Content-Type": "application/octet-stream"})
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.requests[-1].body, body)

    def test_large_body_is_streamed_intact(self):
        body = os.urandom(3 * 1024 * 1024 + 17)
        response, _ = request(self.proxy, "POST", "/upload", body=body)
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.requests[-1].body, body)

    def test_chunked_request_body_is_decoded_and_forwarded(self):
        conn = https(self.proxy)
        pieces = [b"hello ", b"chunked ", b"world" * 1000]
        conn.request("POST", "/v1/chunked", body=iter(pieces),
                     headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        response = conn.getresponse()
        response.read()
        conn.close()
        self.assertEqual(response.status, 200)
        self.assertEqual(self.upstream.requests[-1].body, b"".join(pieces))

    def test_expect_continue_is_answered_by_the_proxy(self):
        sock = tls_socket(self.proxy)
        sock.sendall(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        interim = sock.recv(100)
        self.assertTrue(interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim)
        sock.sendall(b"hello")
        rest = read_http_response(sock)
        sock.close()
        self.assertIn(b"HTTP/1.1 200", interim + rest)
        self.assertEqual(self.upstream.requests[-1].body, b"hello")
        self.assertNotIn("expect", self.upstream.requests[-1].header_names())

    def test_head_and_204_have_no_body_and_keep_the_connection(self):
        def responder(handler, request):
            if request.path == "/empty":
                handler.send_response(204)
                handler.end_headers()
            else:
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", "1234")
                handler.end_headers()
        self.upstream.responder = responder
        conn = https(self.proxy)
        conn.request("HEAD", "/api/tags")
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.getheader("Content-Length"), "1234")
        self.assertEqual(response.read(), b"")
        conn.request("GET", "/empty")
        response = conn.getresponse()
        self.assertEqual(response.status, 204)
        self.assertEqual(response.read(), b"")
        self.upstream.responder = echo_responder
        conn.request("GET", "/after")
        response = conn.getresponse()
        self.assertEqual(json.loads(response.read())["path"], "/after")
        conn.close()

    def test_sequential_requests_reuse_one_backend_connection(self):
        conn = https(self.proxy)
        for i in range(10):
            conn.request("POST", "/v1/chat/completions", body=b'{"i": %d}' % i)
            self.assertEqual(conn.getresponse().read()[:1], b"{")
        conn.close()
        self.assertEqual(len(self.upstream.requests), 10)
        self.assertEqual(self.upstream.connections, 1)


class StreamingTests(unittest.TestCase):
    def test_sse_events_arrive_while_the_backend_holds_the_stream(self):
        release = threading.Event()
        done = threading.Event()

        def responder(handler, request):
            handler.start_chunked()
            handler.send_chunk(b"data: first\n\n")
            # The second event is only sent after the client has seen the first one.
            released = release.wait(10)
            handler.send_chunk(b"data: second %s\n\n" % (b"after" if released else b"timeout"))
            handler.end_chunked()
            done.set()

        upstream = start_upstream(self, responder)
        server = start_proxy(self, upstream.port)
        conn = https(server)
        conn.request("POST", "/v1/chat/completions", body=b'{"stream": true}')
        response = conn.getresponse()
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        first = response.read1(65536)
        self.assertEqual(first, b"data: first\n\n")
        self.assertFalse(done.is_set())
        release.set()
        self.assertEqual(response.read(), b"data: second after\n\n")
        conn.close()

    def test_backend_dying_mid_stream_aborts_the_client_connection(self):
        def responder(handler, request):
            handler.start_chunked()
            handler.send_chunk(b"data: partial\n\n")
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True

        upstream = start_upstream(self, responder)
        server = start_proxy(self, upstream.port)
        conn = https(server)
        conn.request("POST", "/v1/chat/completions", body=b"{}")
        response = conn.getresponse()
        with self.assertRaises((http.client.IncompleteRead, ConnectionError, ssl.SSLError)):
            response.read()
        conn.close()

    def test_client_disconnect_mid_stream_closes_the_backend_connection(self):
        closed = threading.Event()

        def responder(handler, request):
            handler.start_chunked()
            for i in range(2000):
                try:
                    handler.send_chunk(b"data: %d\n\n" % i)
                except OSError:
                    closed.set()
                    return
                time.sleep(0.01)

        upstream = start_upstream(self, responder)
        server = start_proxy(self, upstream.port)
        sock = tls_socket(server)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        received = b""
        while b"data: 0" not in received:
            piece = sock.recv(4096)
            self.assertTrue(piece, "stream ended before the first event")
            received += piece
        sock.close()
        self.assertTrue(closed.wait(5), "backend kept streaming after the client left")

    def test_client_leaving_during_a_silent_prefill_frees_the_backend(self):
        backend_saw_close = threading.Event()

        def responder(handler, request):
            # A model still processing the prompt: no byte yet. Watch for the proxy hanging up.
            import select as select_module
            for _ in range(100):
                readable, _, _ = select_module.select([handler.connection], [], [], 0.05)
                if readable and handler.connection.recv(1) == b"":
                    backend_saw_close.set()
                    return
            handler.send_json(200, {"late": True})

        upstream = start_upstream(self, responder)
        server = start_proxy(self, upstream.port)
        sock = tls_socket(server)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.assertTrue(wait_until(lambda: len(upstream.requests) == 1))
        sock.close()
        self.assertTrue(backend_saw_close.wait(3), "the backend kept working for a departed client")
        snapshot = settled_stats(server)
        self.assertEqual(snapshot["errors"], 1)
        self.assertEqual(snapshot["recent"][0]["status"], 499)

    def test_unknown_length_response_to_http10_client_is_close_delimited(self):
        def responder(handler, request):
            handler.start_chunked(content_type="text/plain")
            handler.send_chunk(b"abc")
            handler.send_chunk(b"def")
            handler.end_chunked()
        upstream = start_upstream(self, responder)
        server = start_proxy(self, upstream.port)
        sock = tls_socket(server)
        sock.sendall(b"GET /stream HTTP/1.0\r\nHost: x\r\n\r\n")
        data = read_http_response(sock)
        sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertNotIn(b"chunked", head.lower())
        self.assertEqual(body, b"abcdef")


class UpstreamFaultTests(unittest.TestCase):
    def test_refused_backend_gives_json_502_with_cors(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead_port = probe.getsockname()[1]
        server = start_proxy(self, dead_port)
        response, data = request(server, "POST", "/v1/messages", body=b"{}",
                                 headers={"Origin": "https://studio.example"})
        self.assertEqual(response.status, 502)
        error = json.loads(data)
        self.assertEqual(error["type"], "error")
        self.assertIn("Cannot connect to http://127.0.0.1:%d" % dead_port, error["error"]["message"])
        self.assertIn("connection refused", error["error"]["message"])
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "https://studio.example")

    def test_silent_backend_gives_504(self):
        def responder(handler, request):
            time.sleep(3)
        upstream = start_upstream(self, responder)
        server = start_proxy(self, upstream.port, read_timeout=0.5)
        response, data = request(server, "GET", "/api/tags")
        self.assertEqual(response.status, 504)
        self.assertIn("did not answer within 0.5s", json.loads(data)["error"]["message"])

    def test_stale_pooled_connection_is_retried_once(self):
        """The backend closes a pooled keep-alive connection on reading the next request, not
        while it sat idle: the pool's idle check passes it as fresh, the request fails on it,
        and round_trip sends the GET again once on a new connection. The client sees a 200."""
        def responder(handler, request):
            if len(handler.server.requests) == 2:
                handler.close_connection = True     # read the request, hang up unanswered
                return
            handler.send_json(200, {"n": len(handler.server.requests)})
        upstream = start_upstream(self, responder)
        server = start_proxy(self, upstream.port)
        reused = []
        acquire = server.upstream.acquire

        def recording_acquire():
            conn, was_reused = acquire()
            reused.append(was_reused)
            return conn, was_reused
        server.upstream.acquire = recording_acquire
        response, data = request(server, "GET", "/v1/models")
        self.assertEqual((response.status, json.loads(data)["n"]), (200, 1))
        # The first connection must be back in the pool before the next request asks for one.
        self.assertTrue(wait_until(lambda: len(server.upstream._idle) == 1))
        with self.assertLogs("llm-proxy", "DEBUG") as logs:
            response, data = request(server, "GET", "/v1/models")
        self.assertEqual((response.status, json.loads(data)["n"]), (200, 3))
        self.assertEqual(reused, [False, True, False])    # the stale one was handed out as fresh
        self.assertEqual(upstream.connections, 2)
        self.assertTrue([line for line in logs.output if "retrying once" in line], logs.output)
        self.assertEqual(settled_stats(server)["errors"], 0)

    def test_a_post_the_backend_may_have_read_is_never_sent_twice(self):
        def responder(handler, request):
            if len(handler.server.requests) == 1:
                handler.send_json(200, {"first": True})
            else:
                # Read the request, then hang up without answering.
                handler.close_connection = True
        upstream = start_upstream(self, responder)
        server = start_proxy(self, upstream.port)
        conn = https(server)
        conn.request("POST", "/v1/chat/completions", body=b"{}")
        self.assertEqual(conn.getresponse().read(), b'{"first": true}')
        conn.request("POST", "/v1/chat/completions", body=b"{}")
        response = conn.getresponse()
        response.read()
        conn.close()
        self.assertEqual(response.status, 502)
        self.assertEqual(len(upstream.requests), 2, "the POST was replayed")

    def test_backend_closing_inside_a_content_length_body_aborts_the_client(self):
        # A clean FIN, 90 bytes short of the declared length.
        port = one_shot_backend(self, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: 100\r\n\r\n" + b"[" * 10)
        server = start_proxy(self, port)
        conn = https(server, timeout=5)
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        # The proxy resets the connection: seen as a short read or as the reset itself.
        with self.assertRaises((http.client.IncompleteRead, ConnectionError, ssl.SSLError)):
            response.read()
        conn.close()
        self.assertEqual(settled_stats(server)["errors"], 1)

    def test_connections_with_descriptors_past_fd_setsize_are_served(self):
        upstream = start_upstream(self)
        server = start_proxy(self, upstream.port)
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 1300:
            self.skipTest("the file-descriptor limit is below 1300 here")
        if soft != resource.RLIM_INFINITY and soft < 1300:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1300, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        # select() cannot take a descriptor above 1024 (FD_SETSIZE); a busy proxy has them.
        fillers = [open(os.devnull) for _ in range(1100)]
        self.addCleanup(lambda: [f.close() for f in fillers])
        response, data = request(server, "POST", "/v1/chat/completions", body=b"{}")
        self.assertEqual(response.status, 200)
        response, data = request(server, "POST", "/v1/chat/completions", body=b"{}")
        self.assertEqual(response.status, 200)

    def test_garbage_from_backend_gives_502(self):
        server = start_proxy(self, one_shot_backend(self, b"this is not http\r\n\r\n"))
        response, data = request(server, "GET", "/api/tags")
        self.assertEqual(response.status, 502)
        self.assertIn("invalid HTTP response", json.loads(data)["error"]["message"])


class CorsTests(unittest.TestCase):
    def setUp(self):
        self.upstream = start_upstream(self)

    def preflight(self, server, origin, extra=None):
        headers = {"Origin": origin, "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization, content-type, x-api-key, "
                                                     "anthropic-version, x-stainless-os"}
        headers.update(extra or {})
        return request(server, "OPTIONS", "/v1/messages", headers=headers)

    def test_preflight_is_answered_and_never_forwarded(self):
        server = start_proxy(self, self.upstream.port)
        response, body = self.preflight(server, "https://studio.example",
                                        {"Access-Control-Request-Private-Network": "true"})
        self.assertEqual(response.status, 204)
        self.assertEqual(body, b"")
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "https://studio.example")
        allowed = response.getheader("Access-Control-Allow-Headers").lower()
        for name in ("authorization", "x-api-key", "anthropic-version", "x-stainless-os"):
            self.assertIn(name, allowed)
        self.assertIn("POST", response.getheader("Access-Control-Allow-Methods"))
        self.assertEqual(response.getheader("Access-Control-Allow-Private-Network"), "true")
        self.assertTrue(response.getheader("Access-Control-Max-Age"))
        self.assertIn("Origin", response.getheader("Vary"))
        self.assertEqual(self.upstream.requests, [])

    def test_disallowed_origin_is_refused_readably_and_not_forwarded(self):
        # Issue 12 item 5: the refusal is readable by the web app (it can show "add your origin
        # to proxy.allowedOrigins" instead of an opaque CORS error), and still never forwarded.
        server = start_proxy(self, self.upstream.port, allowed_origins=("https://studio.example",))
        response, _ = self.preflight(server, "https://evil.example")
        self.assertEqual(response.status, 204)
        response, body = request(server, "POST", "/v1/messages", body=b"{}",
                                 headers={"Origin": "https://evil.example"})
        self.assertEqual(response.status, 403)
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "https://evil.example")
        self.assertIn("proxy.allowedOrigins", json.loads(body)["error"]["message"])
        self.assertEqual(self.upstream.requests, [])
        response, _ = self.preflight(server, "https://studio.example")
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "https://studio.example")

    def test_origin_is_not_forwarded_to_the_backend(self):
        server = start_proxy(self, self.upstream.port)
        response, _ = request(server, "POST", "/api/chat", body=b"{}",
                              headers={"Origin": "https://studio.example"})
        self.assertEqual(response.status, 200)
        self.assertNotIn("origin", self.upstream.requests[-1].header_names())
        self.assertEqual(response.getheader("Access-Control-Allow-Origin"), "https://studio.example")

    def test_origin_is_forwarded_when_configured(self):
        server = start_proxy(self, self.upstream.port, forward_origin=True)
        request(server, "POST", "/api/chat", body=b"{}", headers={"Origin": "https://a.example"})
        self.assertEqual(self.upstream.requests[-1].header("Origin"), "https://a.example")


class RefusalTests(unittest.TestCase):
    def setUp(self):
        self.upstream = start_upstream(self)
        self.proxy = start_proxy(self, self.upstream.port)

    def raw(self, data: bytes) -> bytes:
        sock = tls_socket(self.proxy)
        sock.sendall(data)
        reply = read_http_response(sock)
        sock.close()
        return reply

    def test_absolute_form_and_connect_are_refused(self):
        reply = self.raw(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 400"), reply[:60])
        self.assertIn(b"open relay", reply)
        reply = self.raw(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 405"), reply[:60])
        self.assertEqual(self.upstream.requests, [])

    def test_ambiguous_framing_is_refused_and_the_connection_closed(self):
        cases = [
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
            b"POST / HTTP/1.1\nHost: x\nContent-Length: 0\n\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n folded: value\r\n\r\n",
        ]
        for case in cases:
            reply = self.raw(case)
            self.assertTrue(reply.startswith(b"HTTP/1.1 400"), (case, reply[:80]))
            self.assertIn(b"Connection: close", reply)
        self.assertEqual(self.upstream.requests, [])

    def test_oversized_heads_get_414_and_431(self):
        reply = self.raw(b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 414"), reply[:60])
        reply = self.raw(b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 431"), reply[:60])
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(300))
        reply = self.raw(b"GET / HTTP/1.1\r\n" + many + b"\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 431"), reply[:60])


class TlsServerTests(unittest.TestCase):
    def test_silent_tls_client_does_not_block_others(self):
        upstream = start_upstream(self)
        server = start_proxy(self, upstream.port)
        silent = [socket.create_connection(("127.0.0.1", server.server_address[1]))
                  for _ in range(5)]
        self.addCleanup(lambda: [s.close() for s in silent])
        started = time.monotonic()
        response, _ = request(server, "GET", "/api/tags", timeout=5)
        self.assertEqual(response.status, 200)
        self.assertLess(time.monotonic() - started, 4.0)

    def test_connections_past_the_limit_are_turned_away_and_served_again_later(self):
        upstream = start_upstream(self)
        server = start_proxy(self, upstream.port, max_connections=3, max_connections_per_client=3)
        held = [tls_socket(server) for _ in range(3)]
        self.addCleanup(lambda: [s.close() for s in held])
        with self.assertRaises((ssl.SSLError, ConnectionError, OSError)):
            extra = tls_socket(server, timeout=5)
            extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            if not extra.recv(100):
                raise ConnectionError("closed")
        held.pop().close()
        self.assertTrue(wait_until(lambda: server.slots.open < 3))
        response, _ = request(server, "GET", "/api/tags")
        self.assertEqual(response.status, 200)

    def test_tls_1_1_is_refused(self):
        upstream = start_upstream(self)
        server = start_proxy(self, upstream.port)
        context = client_context()
        try:
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        except (ValueError, ssl.SSLError):
            self.skipTest("this OpenSSL cannot even offer TLS 1.1")
        raw = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5)
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            context.wrap_socket(raw, server_hostname="localhost")
        raw.close()

    def test_alpn_is_http11(self):
        upstream = start_upstream(self)
        server = start_proxy(self, upstream.port)
        context = client_context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        raw = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5)
        sock = context.wrap_socket(raw, server_hostname="localhost")
        self.assertEqual(sock.selected_alpn_protocol(), "http/1.1")
        self.assertIn(sock.version(), ("TLSv1.2", "TLSv1.3"))
        sock.close()


if __name__ == "__main__":
    unittest.main()
