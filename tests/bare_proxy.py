#!/usr/bin/env python3
"""The "bare shape" baseline of tests/bench.py (issue 16): the smallest honest proxy in our design.

    python3 tests/bare_proxy.py PORT CERT KEY UPSTREAM_PORT

ThreadingHTTPServer + ssl (handshake in the worker thread) + http.client, read1() streaming, one
upstream connection per client connection. No usage tap, no stats, no CORS, no hardening: it
measures what the shape itself costs, so the table can show what proxy.py's features cost on top.
Written for the benchmark only; loopback only.
"""
import http.client
import socket
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-connection", "content-length"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.request.do_handshake()           # in this worker thread, not the accept loop
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK
        # add ~40 ms to every answer.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()
        self.upstream = http.client.HTTPConnection("127.0.0.1", UPSTREAM, timeout=600)
        self.upstream.connect()
        self.upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def finish(self):
        super().finish()
        self.upstream.close()

    def log_message(self, *args):
        pass

    def _relay(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        try:
            self.upstream.request(self.command, self.path, body, headers)
            response = self.upstream.getresponse()
        except (OSError, http.client.HTTPException):
            self.upstream.close()
            self.send_error(502)
            return
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP:
                self.send_header(key, value)
        chunked = response.length is None
        self.send_header("Transfer-Encoding" if chunked else "Content-Length",
                         "chunked" if chunked else str(response.length))
        self.end_headers()
        while response.length != 0:         # read1(0) at the end would never close it
            data = response.read1(65536)
            if not data:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        response.close()                     # lets the next request reuse the connection
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _relay


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def get_request(self):
        sock, address = self.socket.accept()
        return CONTEXT.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address


if __name__ == "__main__":
    PORT, CERT, KEY, UPSTREAM = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    CONTEXT.load_cert_chain(CERT, KEY)
    Server(("127.0.0.1", PORT), Handler).serve_forever()
