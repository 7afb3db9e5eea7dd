"""Tests for issue 13 items 1 and 5: API formats as one table, the stripper as its own
component, reader failures told apart from "no usage", and the relay loop's framing plan.

Run: python3 tests/run.py test_formats
"""

import json
import unittest
from unittest import mock

from support import proxy


def sse_event(obj):
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class FormatTableTests(unittest.TestCase):
    def test_every_suffix_of_every_row_classifies_to_its_row(self):
        for api in proxy.API_FORMATS:
            for suffix in api.suffixes:
                for prefix in ("", "/v1", "/ollama/v1"):
                    self.assertEqual(proxy.classify_endpoint(prefix + suffix), api.kind, suffix)
                    self.assertEqual(proxy.classify_endpoint(prefix + suffix.upper() + "/"),
                                     api.kind, suffix)

    def test_the_longest_suffix_wins_whatever_the_row_order(self):
        # "/api/embeddings" ends in "/embeddings" too; "/chat/completions" in "/completions".
        self.assertEqual(proxy.classify_endpoint("/api/embeddings"), "ollama_embed")
        self.assertEqual(proxy.classify_endpoint("/v1/chat/completions"), "openai_chat")
        self.assertEqual(proxy.classify_endpoint("/v1/messages/count_tokens"),
                         "anthropic_count_tokens")
        lengths = [len(suffix) for suffix, _ in proxy.USAGE_ENDPOINT_SUFFIXES]
        self.assertEqual(lengths, sorted(lengths, reverse=True))

    def test_the_kind_sets_are_the_table_columns(self):
        rows = proxy.API_FORMATS
        self.assertEqual(proxy.USAGE_KINDS, {f.kind for f in rows if f.usage})
        self.assertEqual(proxy.USAGE_COMPLETION_KINDS, {f.kind for f in rows if f.completion})
        for api in rows:
            self.assertIs(proxy.api_format(api.kind), api)
            self.assertEqual(proxy.is_completion_kind(api.kind), api.completion)
        self.assertIsNone(proxy.api_format(None))
        self.assertIsNone(proxy.api_format("no_such_kind"))

    def test_only_rows_that_may_inject_get_include_usage(self):
        body = b'{"model":"m","stream":true,"messages":[]}'
        for api in proxy.API_FORMATS:
            injected = proxy.inject_stream_usage(api.kind, body)
            self.assertEqual(injected is not None, api.inject_usage, api.kind)


class ReaderFailureTests(unittest.TestCase):
    """A reader that breaks is a bug: said once per format at WARNING, counted, not "missing"
    silently -- and the client's bytes are untouched."""

    def broken_row(self, kind):
        def extract(found, obj, event):
            raise KeyError("a shape the reader did not expect")
        return mock.patch.dict(proxy._API_FORMAT_BY_KIND,
                               {kind: proxy.api_format(kind)._replace(extract=extract)})

    def test_a_failure_warns_once_per_format_and_is_counted(self):
        body = json.dumps({"model": "m", "usage": {"prompt_tokens": 3}}).encode()
        before = dict(proxy.usage_reader_failures)
        with self.broken_row("openai_embeddings"), \
                mock.patch.dict(proxy.usage_reader_failures, clear=True):
            with self.assertLogs(proxy.log, "WARNING") as logs:
                for _ in range(3):
                    tap = proxy.UsageTap("openai_embeddings", None, "application/json", None)
                    self.assertIs(tap.feed(body), body)
                    _, usage = tap.finish(True)
                    self.assertTrue(tap.failed)
                    self.assertEqual(usage["source"], "missing")
            self.assertEqual(proxy.usage_reader_failures, {"openai_embeddings": 3})
            warnings = [r for r in logs.records if r.levelname == "WARNING"]
            self.assertEqual(len(warnings), 1, [r.getMessage() for r in warnings])
            self.assertIn("openai_embeddings", warnings[0].getMessage())
            self.assertNotIn("prompt_tokens", warnings[0].getMessage(), "no body in the log")
        self.assertEqual(proxy.usage_reader_failures, before)

    def test_a_stream_without_usage_is_missing_but_no_failure(self):
        with mock.patch.dict(proxy.usage_reader_failures, clear=True):
            tap = proxy.UsageTap("openai_chat", None, "text/event-stream", None)
            tap.feed(sse_event({"model": "m", "choices": [{"delta": {"content": "x"}}]}))
            _, usage = tap.finish(True)
            self.assertEqual(usage["source"], "missing")
            self.assertFalse(tap.failed)
            self.assertEqual(proxy.usage_reader_failures, {})


class StripperTests(unittest.TestCase):
    def test_the_tap_never_edits_even_for_an_injected_request(self):
        piece = sse_event({"model": "m", "choices": [], "usage": None})
        tap = proxy.UsageTap("openai_chat", None, "text/event-stream", None, injected=True)
        self.assertIs(tap.feed(piece), piece)

    def test_stripping_is_wanted_only_for_injected_plain_sse(self):
        wanted = proxy.InjectedUsageStripper.wanted
        self.assertTrue(wanted(True, "text/event-stream; charset=utf-8", ""))
        self.assertTrue(wanted(True, "text/event-stream", "identity"))
        self.assertFalse(wanted(False, "text/event-stream", ""))
        self.assertFalse(wanted(True, "text/event-stream", "gzip"))
        self.assertFalse(wanted(True, "application/json", ""))


class FakeResponse:
    def __init__(self, status=200, headers=(), chunked=False, length=None):
        self.status, self.chunked, self.length = status, chunked, length
        self.headers = dict((k.lower(), v) for k, v in headers)

    def getheader(self, name, default=None):
        return self.headers.get(name.lower(), default)


class PlanFramingTests(unittest.TestCase):
    def plan(self, method="POST", version="HTTP/1.1", edited=False, **kwargs):
        return proxy.plan_framing(FakeResponse(**kwargs), method, version, edited)

    def test_a_content_length_body_keeps_its_length_and_holds_its_head(self):
        f = self.plan(headers=[("Content-Type", "application/json")], length=120)
        self.assertEqual(f, proxy.Framing(has_body=True, streamed=False, reframed=False,
                                          chunked=False, hold_head=True))

    def test_a_stream_sends_its_head_at_once_even_with_a_length(self):
        f = self.plan(headers=[("Content-Type", "text/event-stream")], length=120)
        self.assertTrue(f.streamed)
        self.assertFalse(f.hold_head)
        self.assertFalse(f.reframed)

    def test_a_chunked_or_unknown_length_body_is_chunked_for_http_1_1(self):
        for kwargs in ({"chunked": True}, {"length": None}):
            f = self.plan(**kwargs)
            self.assertTrue(f.reframed and f.chunked, kwargs)
            self.assertFalse(f.hold_head, kwargs)

    def test_http_1_0_clients_get_a_close_delimited_body(self):
        f = self.plan(version="HTTP/1.0", chunked=True)
        self.assertTrue(f.reframed)
        self.assertFalse(f.chunked)

    def test_an_edited_body_loses_its_length(self):
        f = self.plan(edited=True, headers=[("Content-Type", "text/event-stream")], length=99)
        self.assertTrue(f.reframed and f.chunked)

    def test_no_body_no_framing(self):
        for method, status in (("HEAD", 200), ("POST", 204), ("GET", 304), ("GET", 103)):
            f = self.plan(method=method, status=status, chunked=True)
            self.assertEqual(f, proxy.Framing(False, False, False, False, False),
                             (method, status))


class BodyPipeTests(unittest.TestCase):
    def test_held_back_bytes_never_look_like_the_end_of_the_body(self):
        event = sse_event({"model": "m", "choices": [{"delta": {"content": "x"}}],
                           "usage": None})
        usage = sse_event({"model": "m", "choices": [],
                           "usage": {"prompt_tokens": 2, "completion_tokens": 1}})
        wire = event + usage + b"data: [DONE]\n\n"
        pieces = [wire[i:i + 7] for i in range(0, len(wire), 7)]
        source = iter(pieces + [b""])
        tap = proxy.UsageTap("openai_chat", None, "text/event-stream", None, injected=True)
        pipe = proxy.BodyPipe(lambda: next(source), tap, proxy.InjectedUsageStripper())
        out = []
        while True:
            data = pipe.read()
            if not data:
                break
            out.append(data)
        out.append(pipe.finish(True))
        self.assertEqual(b"".join(out), event.replace(b',"usage":null', b"") + b"data: [DONE]\n\n")
        self.assertEqual(next(source, "drained"), "drained", "b'' came only at the end")
        self.assertEqual((tap.usage["prompt"], tap.usage["completion"], tap.usage["source"]),
                         (2, 1, "injected"))


if __name__ == "__main__":
    unittest.main()
