"""A stdlib WebSocket (RFC 6455) backend and client for the tunnel tests and the benchmark.

The backend is a real server on 127.0.0.1 port 0: it answers the opening handshake (or refuses
it), requires masked client frames, reassembles fragmented messages, answers pings, and closes
cleanly. Text and binary messages are echoed; a text message starting "cmd:" is an instruction:

    cmd:close          the server starts the closing handshake (Close 1000 "bye")
    cmd:die            the server drops the TCP connection without a Close frame
    cmd:reset          the server resets the TCP connection (RST)
    cmd:ping:<data>    the server sends a Ping; the Pong it gets back is kept in server.pongs
    cmd:fragments      the server sends "one two three" in three fragments, a Ping between them
    cmd:send:<n>       the server sends one binary message of n bytes
    cmd:realtime       the server sends an OpenAI Realtime-style event sequence (see REALTIME_*)

A JSON text message {"type": "response.create", ...} (an OpenAI SDK client) gets the same
sequence without its binary message.

What it received is recorded on the server object (requests, connections, pongs, closes), to
be asserted in the test thread.
"""

import base64
import hashlib
import io
import json
import os
import socket
import socketserver
import struct
import threading
import zlib

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# The usage the realtime script reports: two responses, so the proxy must add them up.
REALTIME_USAGE = (
    {"total_tokens": 180, "input_tokens": 120, "output_tokens": 60,
     "input_token_details": {"cached_tokens": 40, "text_tokens": 80, "audio_tokens": 40},
     "output_token_details": {"text_tokens": 20, "audio_tokens": 40}},
    {"total_tokens": 45, "input_tokens": 30, "output_tokens": 15,
     "input_token_details": {"cached_tokens": 0}, "output_token_details": {}},
)


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def mask_bytes(data: bytes, mask: bytes) -> bytes:
    """XOR data with the 4-byte mask (one big-integer XOR: fast enough for 10 MiB)."""
    if not data:
        return b""
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = False,
                 rsv: int = 0) -> bytes:
    """One frame; client frames are masked, server frames are not (RFC 6455 §5.1)."""
    b0 = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", b0, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, bit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, bit | 127, n)
    if masked:
        mask = os.urandom(4)
        return head + mask + mask_bytes(payload, mask)
    return head + payload


def compressed_frame(compressor, opcode: int, payload: bytes) -> bytes:
    """One server frame compressed with permessage-deflate (RSV1; the 00 00 ff ff tail cut)."""
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return encode_frame(opcode, data[:-4], rsv=0x40)


class ProtocolError(Exception):
    """The peer broke RFC 6455 (e.g. an unmasked client frame)."""


class WebSocket:
    """One side of a WebSocket over a connected (TLS or plain) socket.

    recv() returns (opcode, payload) for a whole data message, or a control frame as it comes.
    """

    def __init__(self, sock, rfile, client: bool, deflate: bool = False):
        self.sock = sock
        self.rfile = rfile
        self.client = client
        # permessage-deflate (RFC 7692) with context takeover: the server compresses what it
        # sends (this client sends uncompressed, which is allowed); both inflate what comes in
        # compressed (Chromium compresses its messages too).
        self.deflate = deflate
        self._compressor = zlib.compressobj(wbits=-15) if deflate and not client else None
        self._inflater = zlib.decompressobj(-15) if deflate else None
        self._compressed = False
        self.fragments_seen = 0
        self._opcode, self._parts = None, []
        self._send_lock = threading.Lock()

    def send(self, opcode: int, payload: bytes = b"", fin: bool = True) -> None:
        if self._compressor is not None and opcode in (OP_TEXT, OP_BINARY) and fin:
            frame = compressed_frame(self._compressor, opcode, payload)
        else:
            frame = encode_frame(opcode, payload, fin, masked=self.client)
        with self._send_lock:
            self.sock.sendall(frame)

    def send_text(self, text: str) -> None:
        self.send(OP_TEXT, text.encode("utf-8"))

    def send_binary(self, data: bytes) -> None:
        self.send(OP_BINARY, data)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a Close frame (the peer answers with its own)."""
        self.send(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8"))

    def _read_exact(self, n: int) -> bytes:
        data = self.rfile.read(n)
        if len(data) != n:
            raise EOFError("connection ended inside a frame" if data else "connection ended")
        return data

    def read_frame(self):
        """(fin, opcode, payload) of the next frame. Raises EOFError at the end of the stream."""
        b0, b1 = self._read_exact(2)
        self._last_b0 = b0
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exact(8))[0]
        masked = bool(b1 & 0x80)
        if masked == self.client:
            raise ProtocolError("client frames must be masked, server frames must not be")
        mask = self._read_exact(4) if masked else b""
        payload = self._read_exact(n)
        if masked:
            payload = mask_bytes(payload, mask)
        return bool(b0 & 0x80), b0 & 0x0F, payload

    def recv(self):
        """The next whole message or control frame as (opcode, payload)."""
        while True:
            fin, op, payload = self.read_frame()
            if op >= OP_CLOSE:
                return op, payload                   # control frames may come between fragments
            if op != OP_CONT:
                self._opcode, self._parts = op, [payload]
                self._compressed = bool(self._last_b0 & 0x40)
            else:
                self._parts.append(payload)
                self.fragments_seen += 1
            if fin:
                message, self._parts = b"".join(self._parts), []
                if self._compressed:
                    message = self._inflater.decompress(message + b"\x00\x00\xff\xff")
                return self._opcode, message


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------

def realtime_script(binary: bool = True, compressor=None):
    """Frames of a Realtime-style session: events as the OpenAI Realtime API sends them (and, with
    `binary`, a binary message among them, which the SDK would refuse to parse)."""
    frames = [encode_frame(OP_TEXT, json.dumps({"type": "session.created", "session": {
        "model": "gpt-realtime-local"}}).encode())]
    for number, usage in enumerate(REALTIME_USAGE):
        frames.append(encode_frame(OP_TEXT, json.dumps(
            {"type": "response.created", "response": {"id": "resp_%d" % number}}).encode()))
        # An audio delta bigger than anything worth parsing, as a base64 text event.
        frames.append(encode_frame(OP_TEXT, json.dumps(
            {"type": "response.output_audio.delta", "delta": "A" * 300000}).encode()))
        if binary:
            frames.append(encode_frame(OP_BINARY, b"\x00" * 1000))
        done = json.dumps({"type": "response.done", "response": {
            "id": "resp_%d" % number, "status": "completed", "model": "gpt-realtime-local",
            "usage": usage}}).encode()
        # The second response.done arrives fragmented, with a Ping in the middle.
        if number == 1:
            third = len(done) // 3
            frames.append(encode_frame(OP_TEXT, done[:third], fin=False))
            frames.append(encode_frame(OP_PING, b"mid"))
            frames.append(encode_frame(OP_CONT, done[third:2 * third], fin=False))
            frames.append(encode_frame(OP_CONT, done[2 * third:]))
        else:
            frames.append(encode_frame(OP_TEXT, done))
    frames.append(encode_frame(OP_TEXT, b'{"type":"script.end"}'))
    if compressor is not None:
        frames = [_recompress(compressor, frame) for frame in _whole_messages(frames)]
    return frames


def _whole_messages(frames):
    """Server frames re-read as (opcode, payload) messages, control frames as they come."""
    ws = WebSocket(None, io.BytesIO(b"".join(frames)), client=True)
    messages = []
    while True:
        try:
            messages.append(ws.recv())
        except EOFError:
            return messages


def _recompress(compressor, message):
    opcode, payload = message
    if opcode in (OP_TEXT, OP_BINARY):
        return compressed_frame(compressor, opcode, payload)
    return encode_frame(opcode, payload)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        server = self.server
        with server.lock:
            server.connections += 1
            server.open += 1
        try:
            while self._handle():     # keep-alive for plain requests, as a real server
                pass
        except (OSError, EOFError, ProtocolError, ValueError):
            pass
        finally:
            with server.lock:
                server.open -= 1
                server.changed.notify_all()

    def _handle(self) -> bool:
        """One request; True when the connection stays open for another."""
        server = self.server
        line = self.rfile.readline(65537).decode("latin-1").rstrip("\r\n")
        if not line:
            return False
        headers = []
        while True:
            raw = self.rfile.readline(65537)
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        method, target, _ = line.split(" ", 2)
        request = {"method": method, "path": target, "headers": headers}
        server.requests.append(request)
        get = {k.lower(): v for k, v in headers}
        if server.raw_answer is not None:
            self.wfile.write(server.raw_answer)
            return False
        if server.refuse is not None:
            status, body = server.refuse
            body = json.dumps(body).encode()
            self.wfile.write(("HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
                              "Content-Length: %d\r\n\r\n" % (status, len(body))).encode() + body)
            return False
        if "websocket" not in get.get("upgrade", "").lower() or "sec-websocket-key" not in get:
            body = b"not a websocket request"
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return get.get("connection", "").lower() != "close"
        lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                 "Sec-WebSocket-Accept: " + accept_key(get["sec-websocket-key"])]
        offered = [p.strip() for p in get.get("sec-websocket-protocol", "").split(",") if p.strip()]
        if offered:
            lines.append("Sec-WebSocket-Protocol: " + offered[0])
        deflate = server.deflate and "permessage-deflate" in get.get("sec-websocket-extensions", "")
        if deflate:
            lines.append("Sec-WebSocket-Extensions: permessage-deflate")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        # The greeting goes in the same write as the 101: the proxy must not lose bytes that
        # arrive together with the handshake answer.
        greeting = encode_frame(OP_TEXT, server.greeting) if server.greeting else b""
        self.wfile.write(head + greeting)
        ws = WebSocket(self.connection, self.rfile, client=False, deflate=deflate)
        self._session(ws)
        return False

    def _session(self, ws):
        server = self.server
        closing = False
        while True:
            try:
                opcode, payload = ws.recv()
            except EOFError:
                server.closes.append("client-eof")
                return
            if opcode == OP_CLOSE:
                if not closing:
                    ws.send(OP_CLOSE, payload)
                server.closes.append("client" if not closing else "server")
                self.connection.shutdown(socket.SHUT_WR)   # the server closes TCP first
                return
            if opcode == OP_PING:
                ws.send(OP_PONG, payload)
            elif opcode == OP_PONG:
                server.pongs.append(payload)
            elif opcode == OP_TEXT and payload.startswith(b"cmd:"):
                outcome = self._command(ws, payload[4:].decode())
                if outcome == "dropped":
                    return
                closing = closing or outcome == "closing"
            elif opcode == OP_TEXT and payload.startswith(b'{"type":"response.create"') or \
                    opcode == OP_TEXT and payload.startswith(b'{"type": "response.create"'):
                # What an OpenAI SDK client sends: answer as a Realtime server does.
                ws.sock.sendall(b"".join(realtime_script(binary=False,
                                                         compressor=ws._compressor)))
            elif opcode in (OP_TEXT, OP_BINARY):
                ws.send(opcode, payload)

    def _command(self, ws, command):
        server = self.server
        if command == "close":
            ws.close(1000, "bye")
            return "closing"
        if command in ("die", "reset"):
            if command == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            server.closes.append(command)
            # The file objects hold the socket open: close them too, so the close is real now.
            self.rfile.close()
            self.wfile.close()
            self.connection.close()
            return "dropped"
        elif command.startswith("ping:"):
            ws.send(OP_PING, command[5:].encode())
        elif command == "fragments":
            ws.send(OP_TEXT, b"one ", fin=False)
            ws.send(OP_PING, b"between")
            ws.send(OP_CONT, b"two ", fin=False)
            ws.send(OP_CONT, b"three")
        elif command.startswith("send:"):
            ws.send(OP_BINARY, b"\xab" * int(command[5:]))
        elif command == "realtime":
            ws.sock.sendall(b"".join(realtime_script(compressor=ws._compressor)))
        return None


class WebSocketBackend(socketserver.ThreadingTCPServer):
    """The echo backend. Set refuse=("403 Forbidden", {...}) to answer handshakes with an error,
    greeting=b"..." to send a text message together with the 101."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self):
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.connections = 0
        self.open = 0
        self.requests = []
        self.pongs = []
        self.closes = []
        self.refuse = None
        self.raw_answer = None        # bytes sent as the whole answer to any request
        self.deflate = False          # agree to permessage-deflate when a client offers it
        self.greeting = b""
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def handle_error(self, request, client_address):
        pass

    def wait_open(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until exactly `count` sessions are open."""
        with self.changed:
            return self.changed.wait_for(lambda: self.open == count, timeout)


def start_backend(test) -> WebSocketBackend:
    """A WebSocketBackend serving in a thread until the test ends."""
    server = WebSocketBackend()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()
        thread.join(5)
    test.addCleanup(stop)
    return server


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------

class Handshake:
    """The answer to an opening handshake: status, headers (lower-case names), the WebSocket
    when the answer was 101, else the body read so far."""

    def __init__(self, status, headers, ws, body):
        self.status = status
        self.headers = headers
        self.ws = ws
        self.body = body


def handshake(sock, host: str, path: str = "/ws", headers=(), key: str = None,
              connection: str = "Upgrade") -> Handshake:
    """Send a WebSocket opening handshake on a connected socket and read the answer."""
    key = key or base64.b64encode(os.urandom(16)).decode("ascii")
    lines = ["GET %s HTTP/1.1" % path, "Host: " + host, "Upgrade: websocket",
             "Connection: " + connection, "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Version: 13"]
    lines += ["%s: %s" % pair for pair in headers]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    rfile = sock.makefile("rb")
    status_line = rfile.readline(65537).decode("latin-1")
    if not status_line:
        raise EOFError("no answer to the handshake")
    status = int(status_line.split(" ")[1])
    answer = {}
    while True:
        raw = rfile.readline(65537)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        answer[name.strip().lower()] = value.strip()
    if status == 101:
        if answer.get("sec-websocket-accept") != accept_key(key):
            raise ProtocolError("wrong Sec-WebSocket-Accept")
        deflate = "permessage-deflate" in answer.get("sec-websocket-extensions", "")
        return Handshake(status, answer, WebSocket(sock, rfile, client=True, deflate=deflate), b"")
    body = rfile.read(int(answer.get("content-length", "0")))
    return Handshake(status, answer, None, body)


def main() -> int:
    """Serve the backend on 127.0.0.1, port 0, until killed; print the port (for the bench)."""
    server = WebSocketBackend()
    print(server.port, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
