"""WebSocket pass-through: real handshakes through the proxy over real TLS to a stdlib backend.

The backend (tests/wsbackend.py) echoes messages and follows "cmd:" instructions; the client is
the same module's RFC 6455 client on a TLS socket that trusts only the test CA.
"""

import dataclasses
import json
import os
import shutil
import signal
import tempfile
import socket
import ssl
import struct
import threading
import time
import unittest

import browser
import proxy
import test_browser
import test_service
import wsbackend
from support import (LOG_BUFFER, ca_file, client_context, settled_stats, start_proxy, tls_socket,
                     wait_until)
from wsbackend import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, handshake, start_backend


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class TunnelTestCase(unittest.TestCase):
    proxy_settings = {}

    def setUp(self):
        self.backend = start_backend(self)
        self.proxy = start_proxy(self, self.backend.port, **self.proxy_settings)
        self.host = "localhost:%d" % self.proxy.server_address[1]

    def connect(self, path="/ws", headers=(), timeout=10.0):
        sock = tls_socket(self.proxy, timeout=timeout)
        self.addCleanup(sock.close)
        return handshake(sock, self.host, path, headers)

    def open_ws(self, path="/ws", headers=()):
        answer = self.connect(path, headers)
        self.assertEqual(answer.status, 101, answer.body)
        return answer.ws

    def assert_ended(self, ws):
        """The client sees the connection end (EOF: close_notify or FIN, or a reset), and then
        closes its socket as a WebSocket client does."""
        with self.assertRaises((EOFError, ConnectionError, ssl.SSLError)):
            ws.recv()
        ws.rfile.close()
        ws.sock.close()

    def close_ws(self, ws):
        """The closing handshake from the client side, to the end of the connection."""
        ws.close()
        self.assertEqual(ws.recv()[0], OP_CLOSE)
        self.assert_ended(ws)


class MessagesTests(TunnelTestCase):
    def test_text_and_binary_messages_both_ways(self):
        ws = self.open_ws()
        ws.send_text("héllo wörld")
        self.assertEqual(ws.recv(), (OP_TEXT, "héllo wörld".encode()))
        blob = bytes(range(256)) * 4
        ws.send_binary(blob)
        self.assertEqual(ws.recv(), (OP_BINARY, blob))
        ws.send_text("")
        self.assertEqual(ws.recv(), (OP_TEXT, b""))
        request = self.backend.requests[0]
        names = {k.lower(): v for k, v in request["headers"]}
        self.assertEqual(names["upgrade"], "websocket")
        self.assertEqual(names["connection"], "Upgrade")
        self.assertEqual(names["sec-websocket-version"], "13")
        self.assertEqual(names["x-forwarded-proto"], "https")

    def test_a_10_mib_message_each_way(self):
        ws = self.open_ws()
        blob = os.urandom(10 * 1024 * 1024)
        ws.send_binary(blob)
        opcode, echoed = ws.recv()
        self.assertEqual(opcode, OP_BINARY)
        self.assertTrue(echoed == blob, "the 10 MiB echo differs")
        ws.send_text("cmd:send:%d" % (10 * 1024 * 1024))
        opcode, sent = ws.recv()
        self.assertEqual((opcode, len(sent), sent[:1], sent[-1:]),
                         (OP_BINARY, 10 * 1024 * 1024, b"\xab", b"\xab"))

    def test_fragmented_messages_and_a_ping_between_fragments(self):
        ws = self.open_ws()
        ws.send(OP_TEXT, b"fr", fin=False)
        ws.send(OP_PING, b"client-ping")
        ws.send(0, b"ag", fin=False)
        ws.send(0, b"ment")
        self.assertEqual(ws.recv(), (OP_PONG, b"client-ping"))
        self.assertEqual(ws.recv(), (OP_TEXT, b"fragment"))
        ws.send_text("cmd:fragments")
        self.assertEqual(ws.recv(), (OP_PING, b"between"))
        self.assertEqual(ws.recv(), (OP_TEXT, b"one two three"))
        self.assertEqual(ws.fragments_seen, 2)

    def test_ping_and_pong_both_ways(self):
        ws = self.open_ws()
        ws.send(OP_PING, b"are you there")
        self.assertEqual(ws.recv(), (OP_PONG, b"are you there"))
        ws.send_text("cmd:ping:from-server")
        opcode, payload = ws.recv()
        self.assertEqual((opcode, payload), (OP_PING, b"from-server"))
        ws.send(OP_PONG, payload)
        self.assertTrue(wait_until(lambda: self.backend.pongs == [b"from-server"]))

    def test_a_client_that_does_not_read_holds_back_the_backend_not_our_memory(self):
        ws = self.open_ws()
        size = 32 * 1024 * 1024
        ws.send_text("cmd:send:%d" % size)
        self.assertTrue(wait_until(lambda: len(self.proxy._tunnels) == 1))
        tunnel = next(iter(self.proxy._tunnels))
        self.assertTrue(wait_until(lambda: tunnel.down >= proxy.TUNNEL_BUFFER_LIMIT))
        bound = proxy.TUNNEL_BUFFER_LIMIT + proxy.READ_CHUNK
        # The kernel buffers fill, then the proxy stops reading: its queue never passes the bound.
        self.assertFalse(wait_until(lambda: tunnel.to_client.size > bound, timeout=1.0),
                         tunnel.to_client.size)
        self.assertLess(tunnel.down, size)
        opcode, data = ws.recv()
        self.assertEqual((opcode, len(data)), (OP_BINARY, size))

    def test_bytes_the_backend_sends_with_its_101_are_not_lost(self):
        self.backend.greeting = b"welcome"
        ws = self.open_ws()
        self.assertEqual(ws.recv(), (OP_TEXT, b"welcome"))

    def test_a_frame_sent_before_the_101_arrives_is_not_lost(self):
        sock = tls_socket(self.proxy)
        self.addCleanup(sock.close)
        # A client that does not wait for the 101: its first frame rides behind the handshake.
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        sock.sendall(("GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n" % (self.host, key)).encode()
                     + wsbackend.encode_frame(OP_TEXT, b"eager", masked=True))
        rfile = sock.makefile("rb")
        self.assertIn(b" 101 ", rfile.readline())
        while rfile.readline() not in (b"\r\n", b""):
            pass
        ws = wsbackend.WebSocket(sock, rfile, client=True)
        self.assertEqual(ws.recv(), (OP_TEXT, b"eager"))

    def test_a_keep_alive_connection_upgrades_and_the_switched_backend_never_returns_to_the_pool(self):
        sock = tls_socket(self.proxy)
        self.addCleanup(sock.close)
        rfile = sock.makefile("rb")
        sock.sendall(("GET /plain HTTP/1.1\r\nHost: %s\r\n\r\n" % self.host).encode())
        self.assertIn(b" 200 ", rfile.readline())
        length = 0
        while True:
            line = rfile.readline()
            if line == b"\r\n":
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        self.assertEqual(rfile.read(length), b"not a websocket request")
        # The same client connection now asks for a WebSocket; the pooled backend connection
        # that served /plain carries the handshake and then belongs to the tunnel.
        answer = handshake(sock, self.host, "/ws")
        self.assertEqual(answer.status, 101)
        answer.ws.send_text("same connection")
        self.assertEqual(answer.ws.recv(), (OP_TEXT, b"same connection"))
        self.assertEqual(self.backend.connections, 1)
        # Meanwhile another request needs a backend connection of its own.
        other = tls_socket(self.proxy)
        self.addCleanup(other.close)
        other.sendall(("GET /plain HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                       % self.host).encode())
        self.assertTrue(other.recv(65536).startswith(b"HTTP/1.1 200 "))
        self.assertEqual(self.backend.connections, 2)
        self.close_ws(answer.ws)

    def test_subprotocol_is_negotiated_end_to_end(self):
        answer = self.connect(headers=[("Sec-WebSocket-Protocol", "chat, superchat")])
        self.assertEqual(answer.status, 101)
        self.assertEqual(answer.headers.get("sec-websocket-protocol"), "chat")
        self.assertEqual(answer.headers.get("upgrade"), "websocket")


class ClosingTests(TunnelTestCase):
    def test_close_from_the_client(self):
        ws = self.open_ws()
        ws.send_text("hi")
        self.assertEqual(ws.recv(), (OP_TEXT, b"hi"))
        ws.close(1000, "done")
        self.assertEqual(ws.recv(), (OP_CLOSE, struct.pack("!H", 1000) + b"done"))
        self.assert_ended(ws)      # the backend closed TCP: passed on as close_notify + FIN
        self.assertEqual(self.backend.closes, ["client"])
        record = settled_stats(self.proxy)["recent"][-1]
        self.assertEqual((record["status"], record["path"], record["error"]), (101, "/ws", False))
        self.assertIn("closed by backend", LOG_BUFFER.getvalue())

    def test_close_from_the_backend(self):
        ws = self.open_ws()
        ws.send_text("cmd:close")
        self.assertEqual(ws.recv(), (OP_CLOSE, struct.pack("!H", 1000) + b"bye"))
        ws.close(1000)
        self.assert_ended(ws)
        self.assertTrue(wait_until(lambda: self.backend.closes == ["server"]))
        self.assertEqual(settled_stats(self.proxy)["inFlight"], 0)

    def test_client_half_close_reaches_the_backend(self):
        ws = self.open_ws()
        ws.send_text("before")
        self.assertEqual(ws.recv(), (OP_TEXT, b"before"))
        sock = ws.sock
        # TCP FIN without a Close frame: the backend sees the end of its input...
        socket.socket.shutdown(sock, socket.SHUT_WR)
        self.assertTrue(wait_until(lambda: self.backend.closes == ["client-eof"]))
        # ...and the tunnel ends both ways once the backend has closed too.
        self.assert_ended(ws)
        self.assertEqual(settled_stats(self.proxy)["inFlight"], 0)

    def test_backend_dying_mid_tunnel_ends_the_client_connection(self):
        for command in ("die", "reset"):
            with self.subTest(command):
                ws = self.open_ws()
                ws.send_text("cmd:" + command)
                self.assert_ended(ws)
                self.assertEqual(settled_stats(self.proxy)["inFlight"], 0)

    def test_client_vanishing_frees_the_backend(self):
        ws = self.open_ws()
        ws.send_text("x")
        self.assertEqual(ws.recv(), (OP_TEXT, b"x"))
        self.assertTrue(self.backend.wait_open(1))
        ws.rfile.close()                        # (it holds the socket open)
        proxy._abort_connection(ws.sock)        # reset, no close_notify, no Close frame
        self.assertTrue(self.backend.wait_open(0))
        self.assertEqual(settled_stats(self.proxy)["inFlight"], 0)


class PerClientLimitTests(TunnelTestCase):
    proxy_settings = {"max_connections": 64, "max_connections_per_client": 3}

    def test_tunnels_count_against_max_connections_per_client(self):
        tunnels = [self.open_ws() for _ in range(3)]
        self.assertEqual(self.proxy.slots.held_by("127.0.0.1"), 3)
        with self.assertRaises((OSError, EOFError)):
            # Turned away before TLS: the handshake (or the first read) fails.
            self.connect()
        self.close_ws(tunnels.pop())
        self.assertTrue(wait_until(lambda: self.proxy.slots.held_by("127.0.0.1") == 2))
        ws = self.open_ws()
        ws.send_text("again")
        self.assertEqual(ws.recv(), (OP_TEXT, b"again"))
        for ws in tunnels + [ws]:
            self.close_ws(ws)


SECRET = "sk-test-websocket-5d0c1e8a2b7f4e91"
BACKEND_SECRET = "backend-key-for-websockets-77aa"


class AccessKeyTests(TunnelTestCase):
    proxy_settings = {"access_keys": (proxy.AccessKey("browser", SECRET),),
                      "target_api_key": BACKEND_SECRET}

    def backend_headers(self, n=-1):
        return {k.lower(): v for k, v in self.backend.requests[n]["headers"]}

    def test_a_handshake_without_a_key_is_401_and_never_reaches_the_backend(self):
        for headers in ([], [("Authorization", "Bearer sk-wrong")],
                        [("Sec-WebSocket-Protocol", "realtime, openai-insecure-api-key.sk-wrong")],
                        [("Sec-WebSocket-Protocol", "openai-insecure-api-key.")]):
            with self.subTest(headers):
                answer = self.connect(headers=headers)
                self.assertEqual(answer.status, 401)
                self.assertEqual(json.loads(answer.body)["error"]["type"], "authentication_error")
        self.assertEqual(self.backend.connections, 0)

    def test_a_key_in_authorization_or_x_api_key_opens_the_tunnel(self):
        for headers in ([("Authorization", "Bearer " + SECRET)], [("x-api-key", SECRET)]):
            with self.subTest(headers[0][0]):
                ws = self.open_ws(headers=headers)
                ws.send_text("in")
                self.assertEqual(ws.recv(), (OP_TEXT, b"in"))
                self.close_ws(ws)
                seen = self.backend_headers()
                self.assertEqual(seen["authorization"], "Bearer " + BACKEND_SECRET)
                self.assertNotIn("x-api-key", seen)

    def test_the_browser_subprotocol_form_is_accepted_and_stripped(self):
        offered = "realtime, openai-insecure-api-key.%s, openai-beta.realtime-v1" % SECRET
        answer = self.connect("/v1/realtime?model=m", headers=[("Sec-WebSocket-Protocol", offered)])
        self.assertEqual(answer.status, 101)
        self.assertEqual(answer.headers["sec-websocket-protocol"], "realtime")
        seen = self.backend_headers()
        self.assertEqual(seen["sec-websocket-protocol"], "realtime, openai-beta.realtime-v1")
        self.assertEqual(seen["authorization"], "Bearer " + BACKEND_SECRET)
        ws = answer.ws
        ws.send_text("cmd:realtime")
        while True:
            opcode, payload = ws.recv()
            if opcode == OP_TEXT and json.loads(payload)["type"] == "script.end":
                break
        self.close_ws(ws)
        stats = settled_stats(self.proxy)
        by_key = self.proxy.stats.snapshot(keys=self.proxy.keys.keys)["byKey"]["browser"]
        self.assertEqual((by_key["requests"], by_key["total"]), (1, 225))
        self.assertEqual(stats["tokens"]["total"], 225)
        self.assertIn("key=browser", LOG_BUFFER.getvalue())
        self.assertNotIn(SECRET, LOG_BUFFER.getvalue())


class IdleTimeoutTests(TunnelTestCase):
    proxy_settings = {"websocket_idle_timeout": 0.8, "client_timeout": 0.5}

    def test_an_idle_tunnel_is_closed_after_websocket_idle_timeout(self):
        ws = self.open_ws()
        started = time.monotonic()
        self.assert_ended(ws)
        self.assertGreaterEqual(time.monotonic() - started, 0.7)
        self.assertTrue(self.backend.wait_open(0))
        self.assertIn("closed by idle", LOG_BUFFER.getvalue())

    def test_traffic_keeps_a_tunnel_open_past_client_timeout(self):
        ws = self.open_ws()
        for n in range(6):
            ws.send_text(str(n))
            self.assertEqual(ws.recv(), (OP_TEXT, str(n).encode()))
            time.sleep(0.2)    # each gap is shorter than the idle timeout, the sum is longer
        self.close_ws(ws)


class RefusalTests(TunnelTestCase):
    proxy_settings = {"allowed_origins": ("https://app.example",)}

    def test_backend_refusing_the_upgrade_is_relayed(self):
        self.backend.refuse = ("403 Forbidden", {"error": "no sockets for you"})
        answer = self.connect()
        self.assertEqual(answer.status, 403)
        self.assertEqual(json.loads(answer.body), {"error": "no sockets for you"})
        self.assertNotIn("upgrade", answer.headers)
        self.assertEqual(settled_stats(self.proxy)["recent"][-1]["status"], 403)

    def test_disallowed_origin_is_refused_and_the_backend_never_contacted(self):
        answer = self.connect(headers=[("Origin", "https://evil.example")])
        self.assertEqual(answer.status, 403)
        self.assertEqual(json.loads(answer.body)["error"]["type"], "origin_not_allowed")
        self.assertEqual(self.backend.connections, 0)
        ws = self.open_ws(headers=[("Origin", "https://app.example")])
        ws.send_text("allowed")
        self.assertEqual(ws.recv(), (OP_TEXT, b"allowed"))

    def test_a_101_that_does_not_switch_to_websocket_is_a_502(self):
        for answer in (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n"
                       b"Connection: Upgrade\r\n\r\n",
                       b"HTTP/1.1 101 Switching Protocols\r\n\r\n"):
            with self.subTest(answer):
                self.backend.raw_answer = answer
                answer = self.connect()
                self.assertEqual(answer.status, 502)
                self.assertIn("did not switch to WebSocket",
                              json.loads(answer.body)["error"]["message"])

    def test_firefox_style_connection_header_is_a_websocket_handshake(self):
        sock = tls_socket(self.proxy)
        self.addCleanup(sock.close)
        answer = handshake(sock, self.host, "/ws", connection="keep-alive, Upgrade")
        self.assertEqual(answer.status, 101)
        answer.ws.send_text("fx")
        self.assertEqual(answer.ws.recv(), (OP_TEXT, b"fx"))

    def test_h2c_upgrade_is_not_forwarded(self):
        sock = tls_socket(self.proxy)
        self.addCleanup(sock.close)
        sock.sendall(("GET /v1/models HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade, HTTP2-Settings"
                      "\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                      % self.host).encode())
        answer = sock.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:100])
        names = {k.lower() for k, _ in self.backend.requests[0]["headers"]}
        self.assertFalse(names & {"upgrade", "connection", "http2-settings"}, names)

    def test_upgrade_post_is_not_a_websocket(self):
        sock = tls_socket(self.proxy)
        self.addCleanup(sock.close)
        sock.sendall(("POST /ws HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\n"
                      "Upgrade: websocket\r\nContent-Length: 2\r\n\r\nhi" % self.host).encode())
        self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 200 "))
        names = {k.lower() for k, _ in self.backend.requests[0]["headers"]}
        self.assertFalse(names & {"upgrade", "connection"}, names)


class AccountingTests(TunnelTestCase):
    def test_a_tunnel_is_one_request_in_flight_then_one_record(self):
        ws = self.open_ws("/socket.io/?EIO=4&transport=websocket")
        ws.send_text("ping")
        self.assertEqual(ws.recv(), (OP_TEXT, b"ping"))
        self.assertEqual(self.proxy.stats.snapshot()["inFlight"], 1)
        self.close_ws(ws)
        stats = settled_stats(self.proxy)
        self.assertEqual(stats["requests"], 1)
        self.assertEqual(stats["byEndpoint"]["/socket.io/"]["requests"], 1)
        line = [l for l in LOG_BUFFER.getvalue().splitlines() if "websocket" in l][-1]
        self.assertIn("/socket.io/ 101 websocket", line)
        self.assertNotIn("EIO=4", line)                       # never the query string
        self.assertRegex(line, r"up \d+B down \d+B closed by backend")

    def test_50_concurrent_tunnels_then_threads_and_fds_back_to_baseline(self):
        base_threads, base_fds = threading.active_count(), open_fds()
        sockets = []
        for n in range(50):
            ws = self.open_ws()
            sockets.append(ws)
        self.assertTrue(self.backend.wait_open(50))
        self.assertEqual(self.proxy.stats.snapshot()["inFlight"], 50)
        # At most one thread per tunnel in the proxy (its handler), plus the backend's one.
        self.assertLessEqual(threading.active_count() - base_threads, 50 * 2)
        for n, ws in enumerate(sockets):
            ws.send_text("m%d" % n)
        for n, ws in enumerate(sockets):
            self.assertEqual(ws.recv(), (OP_TEXT, b"m%d" % n))
        for ws in sockets:
            ws.close()
        for ws in sockets:
            self.assertEqual(ws.recv()[0], OP_CLOSE)
            self.assert_ended(ws)
        self.assertTrue(self.backend.wait_open(0))
        self.assertEqual(settled_stats(self.proxy)["requests"], 50)
        self.assertTrue(wait_until(lambda: threading.active_count() <= base_threads, 10),
                        "threads: %d > %d" % (threading.active_count(), base_threads))
        self.assertTrue(wait_until(lambda: open_fds() <= base_fds, 10),
                        "fds: %d > %d" % (open_fds(), base_fds))

    def test_shutdown_closes_tunnels_after_the_grace_period(self):
        ws = self.open_ws()
        ws.send_text("x")
        self.assertEqual(ws.recv(), (OP_TEXT, b"x"))
        self.assertFalse(self.proxy.wait_for_requests(0.2))   # a tunnel never ends by itself
        self.assertEqual(self.proxy.close_tunnels(), 1)
        self.assertTrue(self.proxy.wait_for_requests(5))
        self.assert_ended(ws)
        self.assertIn("closed by shutdown", LOG_BUFFER.getvalue())

    def test_realtime_usage_is_counted_through_permessage_deflate(self):
        self.backend.deflate = True
        ws = self.open_ws("/v1/realtime?model=m", headers=[
            ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")])
        self.assertTrue(ws.deflate)
        ws.send_text("cmd:realtime")
        while True:
            opcode, payload = ws.recv()
            if opcode == OP_TEXT and json.loads(payload)["type"] == "script.end":
                break
        self.close_ws(ws)
        self.assertEqual(settled_stats(self.proxy)["tokens"]["total"], 225)

    def test_realtime_response_done_usage_is_counted(self):
        ws = self.open_ws("/v1/realtime?model=gpt-realtime-mini")
        ws.send_text("cmd:realtime")
        seen = []
        while True:
            opcode, payload = ws.recv()
            if opcode == OP_TEXT:
                event = json.loads(payload)
                seen.append(event["type"])
                if event["type"] == "script.end":
                    break
        self.assertEqual(seen.count("response.done"), 2)
        self.close_ws(ws)
        stats = settled_stats(self.proxy)
        usage = wsbackend.REALTIME_USAGE
        self.assertEqual(stats["tokens"]["prompt"], sum(u["input_tokens"] for u in usage))
        self.assertEqual(stats["tokens"]["completion"], sum(u["output_tokens"] for u in usage))
        self.assertEqual(stats["tokens"]["total"], 225)
        # The model of response.done wins over the one the URL names.
        self.assertEqual(list(stats["byModel"]), ["gpt-realtime-local"])
        self.assertEqual(stats["byModel"]["gpt-realtime-local"]["requests"], 1)
        self.assertEqual(stats["recent"][-1]["usage"], "reported")


# The page's script: open the WebSocket, send a text and a binary message, collect the echoes,
# close, and report what happened (or the error) as JSON.
CHROMIUM_WS_SCRIPT = """new Promise((resolve) => {
  const out = {events: [], code: null};
  const ws = new WebSocket(%s, %s);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { ws.send("hello from chromium"); ws.send(new Uint8Array([1, 2, 3, 250]).buffer); };
  ws.onmessage = (e) => {
    out.events.push(typeof e.data === "string" ? e.data : Array.from(new Uint8Array(e.data)).join(","));
    if (out.events.length === 2) ws.close(1000, "done");
  };
  ws.onerror = () => out.events.push("error");
  ws.onclose = (e) => { out.code = e.code; resolve(out); };
  setTimeout(() => resolve(Object.assign(out, {timeout: true})), 8000);
})"""


# A Realtime-style session in the page: ask for the script, list the event types to its end.
CHROMIUM_REALTIME_SCRIPT = """new Promise((resolve) => {
  const out = {types: [], code: null, extensions: null};
  const ws = new WebSocket(%s);
  ws.onopen = () => { out.extensions = ws.extensions; ws.send("cmd:realtime"); };
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") return;
    const type = JSON.parse(e.data).type;
    out.types.push(type);
    if (type === "script.end") ws.close(1000);
  };
  ws.onclose = (e) => { out.code = e.code; resolve(out); };
  setTimeout(() => resolve(Object.assign(out, {timeout: true})), 8000);
})"""


@unittest.skipIf(test_browser.missing_tools(), test_browser.missing_tools())
class ChromiumTests(unittest.TestCase):
    """Headless Chromium, trusting the test CA through NSS, opens wss:// to the proxy."""

    def setUp(self):
        self.backend = start_backend(self)
        # The page's origin: another proxy in front of the same backend (its 200 text answer to
        # a plain GET is page enough to run a script in).
        self.page_proxy = start_proxy(self, self.backend.port)
        self.page_origin = "https://localhost:%d" % self.page_proxy.server_address[1]
        self.proxy = start_proxy(self, self.backend.port)
        self.proxy.config = dataclasses.replace(self.proxy.config,
                                                allowed_origins=(self.page_origin,))
        self.ws_url = "wss://localhost:%d/ws" % self.proxy.server_address[1]
        self.home = tempfile.mkdtemp(prefix="llm-proxy-browser-")
        self.addCleanup(shutil.rmtree, self.home, True)

    def exchange(self, chromium, page_url, ws_url=None, protocols=()):
        tab = chromium.new_tab()
        try:
            self.assertIsNone(tab.navigate(page_url))
            self.assertTrue(tab.wait_for("document.readyState === 'complete'"))
            script = CHROMIUM_WS_SCRIPT % (json.dumps(ws_url or self.ws_url),
                                           json.dumps(list(protocols)))
            return tab.evaluate(script, await_promise=True)
        finally:
            tab.close()

    def test_realtime_usage_is_counted_for_chromium_with_permessage_deflate(self):
        self.backend.deflate = True
        url = "wss://localhost:%d/v1/realtime?model=m" % self.proxy.server_address[1]
        with browser.Browser(browser.make_trust_home(ca_file(), self.home)) as chromium:
            tab = chromium.new_tab()
            try:
                self.assertIsNone(tab.navigate(self.page_origin + "/page"))
                self.assertTrue(tab.wait_for("document.readyState === 'complete'"))
                result = tab.evaluate(CHROMIUM_REALTIME_SCRIPT % json.dumps(url),
                                      await_promise=True)
            finally:
                tab.close()
        self.assertEqual(result["extensions"], "permessage-deflate", result)
        self.assertEqual(result["types"].count("response.done"), 2, result)
        self.assertEqual(result["code"], 1000, result)
        self.assertEqual(settled_stats(self.proxy)["tokens"]["total"], 225)

    def test_chromium_sends_an_access_key_the_realtime_way(self):
        keyed = start_proxy(self, self.backend.port, allowed_origins=(self.page_origin,),
                            access_keys=(proxy.AccessKey("browser", SECRET),))
        url = "wss://localhost:%d/v1/realtime?model=m" % keyed.server_address[1]
        with browser.Browser(browser.make_trust_home(ca_file(), self.home)) as chromium:
            allowed = self.exchange(chromium, self.page_origin + "/page", url,
                                    ["realtime", "openai-insecure-api-key." + SECRET])
            refused = self.exchange(chromium, self.page_origin + "/page", url, ["realtime"])
        self.assertEqual(allowed["events"], ["hello from chromium", "1,2,3,250"], allowed)
        self.assertEqual(refused["events"], ["error"], refused)
        seen = [dict((k.lower(), v) for k, v in r["headers"]) for r in self.backend.requests
                if r["path"].startswith("/v1/realtime")]
        self.assertEqual([h.get("sec-websocket-protocol") for h in seen], ["realtime"])
        self.assertNotIn(SECRET, LOG_BUFFER.getvalue())

    def test_chromium_exchanges_messages_over_wss_from_an_allowed_origin(self):
        with browser.Browser(browser.make_trust_home(ca_file(), self.home)) as chromium:
            allowed = self.exchange(chromium, self.page_origin + "/page")
            handshakes = len([r for r in self.backend.requests if r["path"] == "/ws"])
            # The proxy's own origin is not in its allowedOrigins: refused, backend untouched.
            refused = self.exchange(chromium, "https://localhost:%d/page"
                                    % self.proxy.server_address[1])
        self.assertEqual(allowed["events"], ["hello from chromium", "1,2,3,250"], allowed)
        self.assertEqual(allowed["code"], 1000)
        self.assertEqual(handshakes, 1)
        self.assertEqual(refused["events"], ["error"], refused)
        self.assertEqual(refused["code"], 1006)
        self.assertEqual(len([r for r in self.backend.requests if r["path"] == "/ws"]), 1)
        origins = [dict((k.lower(), v) for k, v in r["headers"]).get("origin")
                   for r in self.backend.requests if r["path"] == "/ws"]
        self.assertEqual(origins, [None])     # target.forwardOrigin is off: the proxy owns it
        self.assertEqual(settled_stats(self.proxy)["byEndpoint"]["/ws"]["requests"], 1)


def missing_realtime_sdk():
    try:
        import openai  # noqa: F401
        import websockets  # noqa: F401
    except ImportError:
        return "the openai SDK with websockets is not installed (pip install openai websockets)"
    return None


@unittest.skipIf(missing_realtime_sdk(), missing_realtime_sdk())
class OpenAIRealtimeSDKTests(TunnelTestCase):
    """The official OpenAI SDK's Realtime client, strict TLS, through the proxy."""

    def test_realtime_session_through_the_proxy_with_usage_counted(self):
        import openai
        client = openai.OpenAI(api_key="sk-test-key", max_retries=0,
                               base_url="https://localhost:%d/v1" % self.proxy.server_address[1])
        events = []
        with client.realtime.connect(model="gpt-realtime-mini", websocket_connection_options={
                "ssl": client_context(), "open_timeout": 10}) as connection:
            connection.send({"type": "response.create"})
            for event in connection:
                events.append(event.type)
                if event.type == "response.done" and events.count("response.done") == 2:
                    break
        self.assertEqual(events[0], "session.created")
        request = self.backend.requests[0]
        headers = {k.lower(): v for k, v in request["headers"]}
        self.assertTrue(request["path"].startswith("/v1/realtime?model=gpt-realtime-mini"))
        self.assertEqual(headers["authorization"], "Bearer sk-test-key")
        stats = settled_stats(self.proxy)
        self.assertEqual(stats["tokens"]["total"], 225)
        self.assertEqual(stats["byEndpoint"]["/v1/realtime"]["requests"], 1)


class ShutdownTests(test_service.ServiceTestCase):
    def test_sigterm_closes_an_open_tunnel_after_the_grace_period_and_records_it(self):
        backend = start_backend(self)
        etc = self.mkdir("etc")
        self.copy_test_certs(os.path.join(etc, "certs"))
        config = self.write_config(etc, {
            "proxy": {"port": 0, "bind": "127.0.0.1"},
            "target": {"host": "127.0.0.1", "port": backend.port},
            "tls": {"cert": "certs/cert.pem", "key": "certs/key.pem"},
            "tracking": {"statsFile": "stats.json", "persistInterval": 3600}})
        child, port, err = self.start_proxy(["--config", config])
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        sock = client_context().wrap_socket(raw, server_hostname="localhost")
        self.addCleanup(sock.close)
        ws = handshake(sock, "localhost:%d" % port).ws
        ws.send_text("hi")
        self.assertEqual(ws.recv(), (OP_TEXT, b"hi"))
        code, seconds = self.signal_and_wait(child, signal.SIGTERM)
        self.assertEqual(code, 0)
        self.assertGreaterEqual(seconds, proxy.SHUTDOWN_GRACE_SECONDS - 0.5)
        with self.assertRaises((EOFError, ConnectionError, ssl.SSLError)):
            ws.recv()
        with open(err) as handle:
            log_text = handle.read()
        self.assertIn("closed by shutdown", log_text)
        self.assertNotIn("still in flight", log_text)
        with open(os.path.join(etc, "stats.json")) as handle:
            self.assertEqual(json.load(handle)["byEndpoint"]["/ws"]["requests"], 1)


class RealtimeUsageUnitTests(unittest.TestCase):
    def test_any_split_of_the_stream_gives_the_same_usage(self):
        stream = b"".join(wsbackend.realtime_script())
        for step in (1, 7, 1000, len(stream)):
            tap = proxy.RealtimeUsage()
            for i in range(0, len(stream), step):
                tap.feed(stream[i:i + step])
            self.assertEqual((tap.responses, tap.usage["total"], tap.usage["cacheRead"]),
                             (2, 225, 40), step)

    def test_a_flood_of_tiny_frames_in_one_read_is_fine(self):
        done = json.dumps({"type": "response.done", "response": {"usage": {
            "input_tokens": 1, "output_tokens": 2}}}).encode()
        tap = proxy.RealtimeUsage()
        tap.feed(wsbackend.encode_frame(OP_BINARY, b"x") * 100000
                 + wsbackend.encode_frame(OP_TEXT, done))
        self.assertEqual((tap.responses, tap.usage["total"]), (1, 3))

    def test_permessage_deflate_messages_are_inflated_across_the_shared_window(self):
        import zlib
        stream = b"".join(wsbackend.realtime_script(compressor=zlib.compressobj(wbits=-15)))
        for step in (1, 100, len(stream)):
            tap = proxy.RealtimeUsage(deflate=False)
            for i in range(0, len(stream), step):
                tap.feed(stream[i:i + step])
            self.assertEqual((tap.responses, tap.usage["total"]), (2, 225), step)
        # Without the extension agreed, compressed messages cannot be read.
        tap = proxy.RealtimeUsage()
        tap.feed(stream)
        self.assertEqual(tap.responses, 0)

    def test_server_no_context_takeover_resets_the_window_each_message(self):
        import zlib
        frames = [wsbackend.compressed_frame(zlib.compressobj(wbits=-15), opcode, payload)
                  for opcode, payload in wsbackend._whole_messages(wsbackend.realtime_script())
                  if opcode in (OP_TEXT, OP_BINARY)]
        self.assertIs(proxy.permessage_deflate(
            "permessage-deflate; server_no_context_takeover; client_max_window_bits"), True)
        self.assertIs(proxy.permessage_deflate("permessage-deflate"), False)
        self.assertIsNone(proxy.permessage_deflate("x-webkit-deflate-frame"))
        tap = proxy.RealtimeUsage(deflate=True)
        tap.feed(b"".join(frames))
        self.assertEqual((tap.responses, tap.usage["total"]), (2, 225))

    def test_a_deflate_bomb_is_inflated_in_bounded_steps_and_skipped(self):
        import zlib
        compressor = zlib.compressobj(wbits=-15)
        bomb = wsbackend.compressed_frame(compressor, OP_TEXT, b" " * (64 * 1024 * 1024))
        self.assertLess(len(bomb), 128 * 1024)
        done = json.dumps({"type": "response.done", "response": {"usage": {
            "input_tokens": 2, "output_tokens": 3}}}).encode()
        tap = proxy.RealtimeUsage(deflate=False)
        tap.feed(bomb + wsbackend.compressed_frame(compressor, OP_TEXT, done))
        self.assertEqual((tap.responses, tap.usage["total"]), (1, 5))
        self.assertEqual(len(tap._message), 0)

    def test_the_model_comes_from_the_url_when_response_done_has_none(self):
        done = json.dumps({"type": "response.done", "response": {"usage": {
            "input_tokens": 3, "output_tokens": 4}}}).encode()
        tap = proxy.RealtimeUsage(model="from-url")
        tap.feed(wsbackend.encode_frame(OP_TEXT, done))
        self.assertEqual((tap.model, tap.usage["total"]), ("from-url", 7))

    def test_compressed_and_masked_frames_are_skipped(self):
        done = json.dumps({"type": "response.done", "response": {"usage": {
            "input_tokens": 1, "output_tokens": 1}}}).encode()
        tap = proxy.RealtimeUsage()
        tap.feed(wsbackend.encode_frame(OP_TEXT, done, rsv=0x40))     # permessage-deflate bit
        tap.feed(wsbackend.encode_frame(OP_TEXT, done, masked=True))
        self.assertEqual(tap.responses, 0)
        tap.feed(wsbackend.encode_frame(OP_TEXT, done))
        self.assertEqual(tap.responses, 1)


class ConfigTests(unittest.TestCase):
    def test_websocket_idle_timeout_setting(self):
        self.assertEqual(proxy.config_from({}).websocket_idle_timeout, 3600.0)
        import tempfile
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "config.json")
            with open(path, "w") as handle:
                json.dump({"proxy": {"websocketIdleTimeout": 120}}, handle)
            self.assertEqual(proxy.load_config(path, environ={}).websocket_idle_timeout, 120.0)
            with open(path, "w") as handle:
                json.dump({"proxy": {"websocketIdleTimeout": 0}}, handle)
            with self.assertRaisesRegex(proxy.ConfigError, "websocketIdleTimeout"):
                proxy.load_config(path, environ={})


if __name__ == "__main__":
    unittest.main()
