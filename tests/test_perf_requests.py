"""Per-request fast paths of issue 16 keep every guarantee of the paths they short-cut.

Timings are not tested here (they belong in tests/bench.py): these tests prove that each fast
path gives exactly what the slower, line-by-line code it skips would have given.
"""

import io
import random
import socket
import unittest

from support import proxy, received_while, small_buffer_socketpair


SDK_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\n"
            b"Host: localhost\r\n"
            b"User-Agent: OpenAI/Python 1.54.0\r\n"
            b"Accept: application/json\r\n"
            b"Accept-Encoding: gzip, deflate\r\n"
            b"Content-Type: application/json\r\n"
            b"Authorization: Bearer sk-not-a-real-key\r\n"
            b"X-Stainless-Lang: python\r\n"
            b"Content-Length: 5\r\n"
            b"\r\n")
SEEDS = [
    SDK_HEAD + b"hello",
    b"GET /v1/models HTTP/1.0\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\nGET /again HTTP/1.1\r\n\r\n",
    b"\r\nOPTIONS * HTTP/1.1\r\nHost: h\r\nX-Empty:\r\nX-Tabs:\t a \t\r\n\r\n",
    b"PUT /x?q=1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX: caf\xe9\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
]
# Bytes that sit on the edges of the grammar: line ends, blanks, separators, controls, latin-1.
EDGE_BYTES = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\x00", b"\x7f", b"\x80", b"\xff", b"\x0b",
              b"/", b"HTTP/1.1", b"HTTP/2.0", b"a", b"\r\n\r\n", b"\r\n "]


def outcome(read, data: bytes):
    """What one reader makes of `data`: the head, or the refusal, and the bytes left behind."""
    rfile = io.BufferedReader(io.BytesIO(data))
    try:
        head = read(rfile)
    except proxy.RequestError as exc:
        result = ("refused", exc.status, exc.message)
    except proxy.ClientGone:
        result = ("gone",)
    else:
        result = None if head is None else (head.method, head.target, head.version, head.headers)
    return result, rfile.read()


class WholeHeadFastPathTests(unittest.TestCase):
    """read_request_head() takes a head that arrived whole apart with two regexes; it must
    accept, refuse and leave unread exactly what the line-by-line reader does."""

    def assertSameAsLineReader(self, data: bytes) -> None:
        self.assertEqual(outcome(proxy.read_request_head, data),
                         outcome(proxy._read_head_by_line, data), data)

    def test_seeds_parse_alike(self):
        for data in SEEDS:
            self.assertSameAsLineReader(data)
        result, rest = outcome(proxy.read_request_head, SEEDS[0])
        self.assertEqual(result[3][5], ("Authorization", "Bearer sk-not-a-real-key"))
        self.assertEqual(rest, b"hello")

    def test_mutated_heads_parse_alike(self):
        rng = random.Random(16)
        for _ in range(20000):
            data = bytearray(rng.choice(SEEDS))
            for _ in range(rng.randrange(1, 4)):
                where = rng.randrange(len(data) + 1)
                if rng.random() < 0.3 and where < len(data):
                    del data[where:where + rng.randrange(1, 4)]
                else:
                    data[where:where] = rng.choice(EDGE_BYTES)
            self.assertSameAsLineReader(bytes(data))

    def test_limits_alike(self):
        line = b"X-Long: " + b"v" * 8000 + b"\r\n"
        for data in (b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\n\r\n",
                     b"GET /" + b"a" * 8170 + b" HTTP/1.1\r\n\r\n",
                     b"GET / HTTP/1.1\r\n" + line * 9 + b"\r\n",
                     b"GET / HTTP/1.1\r\nX-Huge: " + b"v" * 17000 + b"\r\n\r\n",
                     b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 128 + b"\r\n",
                     b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 129 + b"\r\n",
                     b"GET / HTTP/1.1\r\n" + b"A:\r\n" * 1000 + b"\r\n"):
            self.assertSameAsLineReader(data)

    def test_a_head_in_pieces_is_read_line_by_line(self):
        """A head not yet whole in the buffer is left to the line reader, which waits for it."""
        class Trickle(io.RawIOBase):
            def __init__(self, data):
                self.pieces = [data[i:i + 7] for i in range(0, len(data), 7)]

            def readable(self):
                return True

            def readinto(self, buffer):
                piece = self.pieces.pop(0) if self.pieces else b""
                buffer[:len(piece)] = piece
                return len(piece)

        head = proxy.read_request_head(io.BufferedReader(Trickle(SEEDS[0])))
        self.assertEqual((head.method, head.get("content-length")), ("POST", "5"))


class SendToBackendTests(unittest.TestCase):
    """send_to_backend() tries one plain write() first; what the kernel does not take at once
    still arrives whole, in order, through sendall() and its timeout."""

    def test_more_than_the_kernel_takes_at_once_arrives_whole(self):
        ours, theirs = small_buffer_socketpair(self)
        ours.settimeout(10)
        data = bytes(random.Random(1).getrandbits(8) for _ in range(1 << 20))
        self.assertEqual(received_while(theirs, len(data),
                                        lambda: proxy.send_to_backend(ours, data)), data)

    def test_a_closed_peer_raises_as_sendall_does(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        ours.settimeout(10)
        theirs.close()
        with self.assertRaises((BrokenPipeError, ConnectionResetError)):
            proxy.send_to_backend(ours, b"GET / HTTP/1.1\r\n\r\n")


class RecordShortcutTests(unittest.TestCase):
    """StatsStore.record() makes a recent entry's time text once per second, and
    _stats_clean_key() returns ASCII strings as they are: the stats stay what they were."""

    def test_recent_times_stay_exact_across_seconds(self):
        store = proxy.StatsStore(history_size=100, clock=lambda: 2000.0)
        times = [1000.2, 1000.9, 1001.0, 1000.5, -0.5, 0.3, 0.0, 86400.99, 86401.0]
        for when in times:
            store.record(proxy.RequestRecord(time=when, method="POST", path="/v1/x",
                                             client="127.0.0.1", status=200, duration_ms=1.0))
        recent = [entry["time"] for entry in reversed(store.snapshot()["recent"])]
        self.assertEqual(recent, [proxy.iso_utc(when) for when in times])

    def test_clean_key_unchanged(self):
        for value in ("/v1/chat/completions", "caf\u00e9", "lone \ud800 surrogate", "x" * 500,
                      "\u00e9" * 300, 12, ""):
            s = value if isinstance(value, str) else str(value)
            if len(s) > proxy._STATS_KEY_MAX_LEN:
                s = s[:proxy._STATS_KEY_MAX_LEN - 3] + "..."
            self.assertEqual(proxy._stats_clean_key(value),
                             s.encode("utf-8", "replace").decode("utf-8"))

    def test_histogram_buckets_unchanged(self):
        store = proxy.StatsStore()
        hist = store._doc["histograms"]["duration"]
        bounds = hist["buckets"]
        for value in [0.0, 0.05, 0.0500001, 1.0, 300.0, 300.5, 1e9] + [b for b in bounds]:
            i = 0
            while i < len(bounds) and value > bounds[i]:
                i += 1
            before = list(hist["counts"])
            proxy._stats_histogram_observe(hist, value)
            before[i] += 1
            self.assertEqual(hist["counts"], before, value)


if __name__ == "__main__":
    unittest.main()
