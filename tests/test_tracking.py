"""Token tracking end to end: real backend formats through the real proxy into /_proxy/stats."""

import gzip
import json
import os
import threading
import unittest

from support import proxy, FakeLLM, start_upstream, start_proxy, https, settled_stats


def call(server, method, path, payload=None, headers=None):
    conn = https(server)
    body = json.dumps(payload).encode() if payload is not None else None
    conn.request(method, path, body=body, headers=dict({"Content-Type": "application/json"},
                                                       **(headers or {})))
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def stats(server):
    """/_proxy/stats over HTTPS, once the requests before it have been recorded."""
    settled_stats(server)
    response, data = call(server, "GET", "/_proxy/stats")
    return json.loads(data)


CHAT = {"model": "qwen3:8b", "messages": [{"role": "user", "content": "Say hello"}]}


class StreamUsageTests(unittest.TestCase):
    def setUp(self):
        self.llm = FakeLLM()
        self.upstream = start_upstream(self, self.llm)
        self.proxy = start_proxy(self, self.upstream.port)

    def test_openai_stream_gets_usage_injected_and_the_client_sees_the_plain_stream(self):
        response, data = call(self.proxy, "POST", "/v1/chat/completions", dict(CHAT, stream=True))
        self.assertEqual(response.status, 200)
        sent = json.loads(self.upstream.requests[-1].body)
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        # The client asked for no usage: no usage chunk, no "usage": null members.
        self.assertNotIn(b"usage", data)
        self.assertIn(b'"content":"Hello"', data)
        self.assertTrue(data.endswith(b"data: [DONE]\n\n"))
        snapshot = stats(self.proxy)
        self.assertEqual(snapshot["tokens"]["prompt"], self.llm.emitted["prompt"])
        self.assertEqual(snapshot["tokens"]["completion"], 6)
        self.assertEqual(snapshot["tokens"]["cacheRead"], self.llm.emitted["cacheRead"])
        self.assertEqual(snapshot["usageReports"]["injected"], 1)
        self.assertEqual(snapshot["byModel"]["qwen3:8b"]["requests"], 1)

    def test_openai_stream_that_asked_for_usage_is_passed_through_untouched(self):
        response, data = call(self.proxy, "POST", "/v1/chat/completions",
                              dict(CHAT, stream=True, stream_options={"include_usage": True}))
        self.assertIn(b'"usage":null', data)
        self.assertIn(b'"prompt_tokens"', data)
        snapshot = stats(self.proxy)
        self.assertEqual(snapshot["usageReports"]["reported"], 1)
        self.assertEqual(snapshot["tokens"]["total"],
                         self.llm.emitted["prompt"] + self.llm.emitted["completion"])

    def test_injection_can_be_switched_off(self):
        proxy_off = start_proxy(self, self.upstream.port, inject_stream_usage=False)
        call(proxy_off, "POST", "/v1/chat/completions", dict(CHAT, stream=True))
        self.assertNotIn("stream_options", json.loads(self.upstream.requests[-1].body))
        snapshot = stats(proxy_off)
        self.assertEqual(snapshot["usageReports"]["missing"], 1)
        self.assertEqual(snapshot["tokens"]["total"], 0)

    def test_anthropic_stream_counts_cache_parts_once(self):
        payload = {"model": "claude-haiku-4-5-20251001", "max_tokens": 20, "stream": True,
                   "messages": [{"role": "user", "content": "Hi"}]}
        response, data = call(self.proxy, "POST", "/v1/messages", payload,
                              {"anthropic-version": "2023-06-01", "x-api-key": "dummy"})
        self.assertIn(b"event: message_stop", data)
        snapshot = stats(self.proxy)
        self.assertEqual(snapshot["tokens"]["prompt"], self.llm.emitted["prompt"])
        self.assertEqual(snapshot["tokens"]["cacheRead"], 100)
        self.assertEqual(snapshot["tokens"]["cacheWrite"], 20)
        self.assertEqual(snapshot["tokens"]["completion"], 6)
        self.assertEqual(snapshot["completions"], 1)

    def test_ollama_chat_streams_ndjson_by_default(self):
        response, data = call(self.proxy, "POST", "/api/chat",
                              {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]})
        self.assertEqual(response.getheader("Content-Type"), "application/x-ndjson")
        self.assertEqual(len(data.splitlines()), 7)
        snapshot = stats(self.proxy)
        self.assertEqual(snapshot["tokens"]["prompt"], self.llm.emitted["prompt"])
        self.assertEqual(snapshot["tokens"]["completion"], 6)
        self.assertEqual(list(snapshot["byModel"]), ["llama3.2"])

    def test_mixed_concurrent_run_counts_exactly_what_the_backend_emitted(self):
        calls = [("/v1/chat/completions", dict(CHAT, stream=True)),
                 ("/v1/chat/completions", dict(CHAT, messages=[{"role": "user", "content": "ab"}])),
                 ("/v1/messages", {"model": "claude-x", "max_tokens": 5, "stream": True,
                                   "messages": [{"role": "user", "content": "hey"}]}),
                 ("/v1/messages", {"model": "claude-x", "max_tokens": 5,
                                   "messages": [{"role": "user", "content": "hey!"}]}),
                 ("/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "q"}]}),
                 ("/api/chat", {"model": "llama3.2", "stream": False,
                                "messages": [{"role": "user", "content": "qq"}]})] * 5
        errors = []

        def worker(path, payload):
            try:
                response, _ = call(self.proxy, "POST", path, payload)
                if response.status != 200:
                    errors.append(response.status)
            except Exception as exc:  # collected and asserted in the test thread
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=c) for c in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(errors, [])
        snapshot = stats(self.proxy)
        emitted = self.llm.emitted
        self.assertEqual(snapshot["requests"], len(calls))
        self.assertEqual(snapshot["completions"], len(calls))
        self.assertEqual(snapshot["errors"], 0)
        self.assertEqual(snapshot["tokens"]["prompt"], emitted["prompt"])
        self.assertEqual(snapshot["tokens"]["completion"], emitted["completion"])
        self.assertEqual(snapshot["tokens"]["cacheRead"], emitted["cacheRead"])
        self.assertEqual(snapshot["tokens"]["cacheWrite"], emitted["cacheWrite"])
        self.assertEqual(snapshot["tokens"]["total"], emitted["prompt"] + emitted["completion"])
        self.assertEqual(sum(m["requests"] for m in snapshot["byModel"].values()), len(calls))


class BodyEncodingTests(unittest.TestCase):
    def test_gzip_response_reaches_the_client_intact_and_is_counted(self):
        payload = json.dumps({"id": "x", "object": "chat.completion", "model": "gz-model",
                              "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4,
                                                       "total_tokens": 15}}).encode()
        compressed = gzip.compress(payload)

        def responder(handler, request):
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Encoding", "gzip")
            handler.send_header("Content-Length", str(len(compressed)))
            handler.end_headers()
            handler.wfile.write(compressed)
        upstream = start_upstream(self, responder)
        server = start_proxy(self, upstream.port)
        response, data = call(server, "POST", "/v1/chat/completions", CHAT,
                              {"Accept-Encoding": "gzip"})
        self.assertEqual(upstream.requests[-1].header("Accept-Encoding"), "gzip")
        self.assertEqual(data, compressed)
        self.assertEqual(response.getheader("Content-Length"), str(len(compressed)))
        snapshot = stats(server)
        self.assertEqual(snapshot["tokens"]["total"], 15)
        self.assertEqual(list(snapshot["byModel"]), ["gz-model"])


class StatsEndpointTests(unittest.TestCase):
    def setUp(self):
        self.llm = FakeLLM()
        self.upstream = start_upstream(self, self.llm)

    def test_stats_has_the_specs_shape_and_is_not_cached(self):
        server = start_proxy(self, self.upstream.port)
        call(server, "POST", "/v1/chat/completions", CHAT)
        response, data = call(server, "GET", "/_proxy/stats")
        self.assertEqual(response.getheader("Cache-Control"), "no-store")
        self.assertTrue(response.getheader("Content-Type").startswith("application/json"))
        snapshot = json.loads(data)
        for key in ("uptime", "requests", "completions", "errors", "tokens", "byModel",
                    "byEndpoint", "byClient", "recent", "hourly", "daily"):
            self.assertIn(key, snapshot)
        for key in ("prompt", "completion", "total", "formatted"):
            self.assertIn(key, snapshot["tokens"])
        self.assertEqual(snapshot["byModel"]["qwen3:8b"]["requests"], 1)
        self.assertEqual(snapshot["byEndpoint"]["/v1/chat/completions"]["requests"], 1)
        self.assertEqual(snapshot["byClient"]["127.0.0.1"]["requests"], 1)
        self.assertEqual(snapshot["recent"][0]["path"], "/v1/chat/completions")
        self.assertEqual(snapshot["recent"][0]["status"], 200)

    def test_internal_routes_are_not_forwarded_or_counted(self):
        server = start_proxy(self, self.upstream.port)
        for path in ("/_proxy/stats", "/_proxy/health", "/_proxy/metrics", "/_proxy/dashboard",
                     "/_proxy/", "/_proxy", "/_proxy/ca.pem", "/_proxy/ca.crt"):
            response, _ = call(server, "GET", path)
            self.assertEqual(response.status, 200, path)
        response, _ = call(server, "GET", "/_proxy/nope")
        self.assertEqual(response.status, 404)
        self.assertEqual(self.upstream.requests, [])
        self.assertEqual(stats(server)["requests"], 0)

    def test_reset_needs_post_and_refuses_other_websites(self):
        server = start_proxy(self, self.upstream.port)
        call(server, "POST", "/v1/chat/completions", CHAT)
        response, _ = call(server, "GET", "/_proxy/reset")
        self.assertEqual(response.status, 405)
        response, _ = call(server, "POST", "/_proxy/reset", headers={"Origin": "https://evil.example"})
        self.assertEqual(response.status, 403)
        self.assertEqual(stats(server)["requests"], 1)
        own = "https://localhost:%d" % server.server_address[1]
        response, data = call(server, "POST", "/_proxy/reset", headers={"Origin": own})
        self.assertEqual((response.status, json.loads(data)), (200, {"ok": True}))
        self.assertEqual(stats(server)["requests"], 0)

    def test_reset_with_admin_token(self):
        server = start_proxy(self, self.upstream.port, admin_token="s3cret")
        response, _ = call(server, "POST", "/_proxy/reset")
        self.assertEqual(response.status, 401)
        response, _ = call(server, "POST", "/_proxy/reset", headers={"Authorization": "Bearer nope"})
        self.assertEqual(response.status, 401)
        response, _ = call(server, "POST", "/_proxy/reset", headers={"Authorization": "Bearer s3cret"})
        self.assertEqual(response.status, 200)

    def test_health_reports_the_backend_up_and_down(self):
        server = start_proxy(self, self.upstream.port)
        response, data = call(server, "GET", "/_proxy/health")
        health = json.loads(data)
        self.assertEqual((response.status, health["status"]), (200, "ok"))
        self.assertTrue(health["backend"]["reachable"])
        self.assertEqual(health["version"], proxy.VERSION)
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]
        down = start_proxy(self, dead)
        response, data = call(down, "GET", "/_proxy/health")
        health = json.loads(data)
        self.assertEqual(response.status, 200)
        self.assertFalse(health["backend"]["reachable"])
        self.assertEqual(health["backend"]["error"], "connection refused")

    def test_ca_downloads_are_the_ca_certificate_and_never_a_key(self):
        server = start_proxy(self, self.upstream.port)
        response, pem = call(server, "GET", "/_proxy/ca.pem")
        with open(os.path.join(os.path.dirname(server.config.cert_file), "ca.pem"), "rb") as f:
            self.assertEqual(pem, f.read())
        self.assertNotIn(b"PRIVATE KEY", pem)
        response, der = call(server, "GET", "/_proxy/ca.crt")
        self.assertEqual(response.getheader("Content-Type"), "application/x-x509-ca-cert")
        self.assertEqual(der, proxy.ca_pem_to_der(pem))

    def test_pages_are_served_with_a_strict_content_security_policy(self):
        server = start_proxy(self, self.upstream.port)
        for path in ("/_proxy/dashboard", "/_proxy/"):
            response, body = call(server, "GET", path)
            policy = response.getheader("Content-Security-Policy")
            self.assertIn("default-src 'none'", policy)
            self.assertIn("script-src 'sha256-", policy)
            self.assertNotIn("unsafe-inline", policy.split("script-src")[1].split(";")[0])
            self.assertEqual(response.getheader("X-Content-Type-Options"), "nosniff")
            self.assertIn(b"<!DOCTYPE html>", body)


class PersistenceTests(unittest.TestCase):
    def test_totals_survive_a_restart(self):
        llm = FakeLLM()
        upstream = start_upstream(self, llm)
        first = start_proxy(self, upstream.port)
        call(first, "POST", "/v1/messages", {"model": "claude-x", "max_tokens": 5,
                                              "messages": [{"role": "user", "content": "hey"}]})
        settled_stats(first)
        self.assertTrue(first.stats.save())
        second = start_proxy(self, upstream.port, stats_file=first.config.stats_file)
        second.stats.load()
        snapshot = stats(second)
        self.assertEqual(snapshot["requests"], 1)
        self.assertEqual(snapshot["tokens"]["prompt"], llm.emitted["prompt"])

    def test_temp_files_of_an_interrupted_save_are_removed_at_start(self):
        import tempfile
        directory = tempfile.mkdtemp(prefix="llm-proxy-stats-")
        path = os.path.join(directory, "stats.json")
        leftover = os.path.join(directory, ".stats.json.k9x2ab_7.tmp")   # as mkstemp names it
        unrelated = os.path.join(directory, ".other.json.k9x2ab_7.tmp")
        for name in (leftover, unrelated):
            with open(name, "w") as handle:
                handle.write('{"half": ')
        proxy.StatsStore(path=path).load()
        self.assertFalse(os.path.exists(leftover))
        self.assertTrue(os.path.exists(unrelated))

    def test_tracking_disabled_parses_nothing_and_writes_nothing(self):
        llm = FakeLLM()
        upstream = start_upstream(self, llm)
        server = start_proxy(self, upstream.port, tracking_enabled=False)
        call(server, "POST", "/v1/chat/completions", dict(CHAT, stream=True))
        self.assertNotIn("stream_options", json.loads(upstream.requests[-1].body))
        server.stats.save()
        self.assertFalse(os.path.exists(server.config.stats_file))
        self.assertEqual(stats(server)["tokens"]["total"], 0)


if __name__ == "__main__":
    unittest.main()
