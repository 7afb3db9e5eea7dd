"""A catch-all reverse-proxy plugin for proxy-py (`pip install proxy.py`), the Python peer in
tests/bench.py (issue 16). Test-only; not imported by anything else.

One backend connection per client connection, reused for each request on it: proxy-py's stock
reverse proxy opens a new upstream per request and fails on keep-alive (its issue #1483).
The backend is 127.0.0.1:$BENCH_UPSTREAM_PORT.
"""
import os

from proxy.core.connection import TcpServerConnection
from proxy.http.server import ReverseProxyBasePlugin

UPSTREAM_PORT = int(os.environ.get("BENCH_UPSTREAM_PORT", "0"))


class CatchAllReverseProxy(ReverseProxyBasePlugin):
    """Every path goes to the bench upstream over this client connection's own connection."""

    def routes(self):
        return [r"/.*"]

    def handle_route(self, request, pattern):
        conn = getattr(self, "_upstream", None)
        if conn is None or conn.closed:
            conn = TcpServerConnection("127.0.0.1", UPSTREAM_PORT)
            conn.connect()
            self._upstream = conn
        conn.queue(memoryview(request.build()))
        return conn
