"""Access keys (issue 14): who may use the model through the proxy, how much each key used, budgets.

Real TLS on 127.0.0.1 with the test CA, real clients: http.client, curl, the official OpenAI and
Anthropic SDKs (skipped when missing), the proxy as a separate process for SIGHUP and the
log/file check, and headless Chromium for a cross-origin fetch() (skipped when missing).
"""

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock

import browser
from support import optional_import
from support import (LOG_BUFFER, ROOT, FakeLLM, ca_file, certs_dir, https, make_config, proxy,
                     settled_stats, start_proxy, start_upstream, wait_until, _serve_in_thread,
                     read_http_response, tls_socket)

openai = optional_import("openai")          # the official SDKs; their tests skip without them
anthropic = optional_import("anthropic")

ALICE = "sk-test-alice-0123456789abcdef"
BOB = "sk-test-bob-fedcba9876543210xyz"
WRONG = "sk-test-wrong-00000000000000000"
BACKEND_KEY = "backend-master-key-4f1c2a9e77"
PROXY_PY = os.path.join(ROOT, "proxy.py")
CHAT = {"model": "qwen3:8b", "messages": [{"role": "user", "content": "hello"}]}


def keys(**limits):
    """alice and bob, with optional limits for alice: keys(daily_tokens=5)."""
    return (proxy.AccessKey("alice", ALICE, limits.get("daily_tokens"),
                            limits.get("requests_per_minute")),
            proxy.AccessKey("bob", BOB))


def post(server, path, payload, headers=None, conn=None):
    """POST JSON through the proxy; returns (status, headers dict lower-cased, parsed body)."""
    own = conn is None
    conn = conn or https(server)
    body = json.dumps(payload).encode()
    conn.request("POST", path, body=body, headers=dict({"Content-Type": "application/json"},
                                                       **(headers or {})))
    response = conn.getresponse()
    raw = response.read()
    if own:
        conn.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw
    return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed


def strict_http_client(sdk):
    context = ssl.create_default_context(cafile=ca_file())
    context.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
    return sdk.DefaultHttpxClient(verify=context, timeout=10)


class Clock:
    """A settable wall clock for StatsStore(clock=...) and RateLimiter(clock=...)."""

    def __init__(self, now):
        self.now = float(now)

    def __call__(self):
        return self.now


def local_time(year, month, day, hour, minute, second):
    return time.mktime((year, month, day, hour, minute, second, 0, 0, -1))


def key_stats(server):
    """The /_proxy/stats document (byKey rows carry the budgets of the keys in force)."""
    settled_stats(server)
    return server.stats.snapshot(keys=server.keys.keys)


def start_proxy_with_store(test, upstream_port, store, **overrides):
    """start_proxy() with a given StatsStore (an injected clock, a shared stats file)."""
    server = proxy.build_server(make_config(upstream_port, **overrides), stats=store)
    test.addCleanup(server.upstream.close_all)
    test.addCleanup(server.wait_for_requests, 5)
    _serve_in_thread(test, server)
    return server


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

class AccessConfigTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="llm-proxy-access-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "config.json")

    def load(self, document, environ=None):
        with open(self.path, "w") as handle:
            json.dump(document, handle)
        return proxy.load_config(self.path, environ=environ or {})

    def test_both_forms_in_order_and_no_keys_by_default(self):
        config = self.load({"access": {"keys": {
            "laptop": ALICE, "phone": {"key": BOB, "dailyTokens": 5000, "requestsPerMinute": 10}}},
            "target": {"apiKey": BACKEND_KEY}})
        self.assertEqual(config.access_keys, (proxy.AccessKey("laptop", ALICE),
                                              proxy.AccessKey("phone", BOB, 5000, 10)))
        self.assertEqual(config.target_api_key, BACKEND_KEY)
        self.assertNotIn(ALICE, repr(config))
        self.assertNotIn(BACKEND_KEY, repr(config))
        self.assertEqual(proxy.load_config(None, environ={}, search_cwd=False).access_keys, ())

    def test_bad_entries_name_the_file_and_entry_never_the_key(self):
        secret = "sk-this-would-be-secret"
        cases = {
            "too short": ({"laptop": "short-key"}, "access.keys.laptop.key"),
            "a space": ({"laptop": secret + " x"}, "access.keys.laptop.key"),
            "a newline": ({"laptop": secret + "\nX-Evil: 1"}, "access.keys.laptop.key"),
            "not a string": ({"laptop": {"key": 12345678901234567890}}, "access.keys.laptop.key"),
            "a bad name": ({"my laptop": secret}, "access.keys.my laptop"),
            "a bad budget": ({"laptop": {"key": secret, "dailyTokens": 0}},
                             "access.keys.laptop.dailyTokens"),
            "a string budget": ({"laptop": {"key": secret, "requestsPerMinute": "10"}},
                                "access.keys.laptop.requestsPerMinute"),
            "an unknown field": ({"laptop": {"key": secret, "daily": 5}}, "access.keys.laptop"),
            "a shared key": ({"a": secret, "b": secret}, "access.keys.b.key"),
            "a list": ({"laptop": [secret]}, "access.keys.laptop"),
        }
        for label, (table, names) in cases.items():
            with self.subTest(label):
                with self.assertRaises(proxy.ConfigError) as caught:
                    self.load({"access": {"keys": table}})
                message = str(caught.exception)
                self.assertIn(self.path, message)
                self.assertIn(names, message)
                self.assertNotIn("would-be-secret", message)
        with self.assertRaises(proxy.ConfigError) as caught:
            self.load({"access": {"keys": secret}})
        self.assertNotIn("would-be-secret", str(caught.exception))
        with self.assertRaises(proxy.ConfigError) as caught:
            self.load({"target": {"apiKey": "abc\r\nX-Evil: yes"}})
        self.assertIn("target.apiKey", str(caught.exception))
        self.assertNotIn("Evil", str(caught.exception))

    def test_a_daily_budget_without_tracking_is_refused(self):
        with self.assertRaises(proxy.ConfigError) as caught:
            self.load({"tracking": {"enabled": False},
                       "access": {"keys": {"laptop": {"key": ALICE, "dailyTokens": 100}}}})
        self.assertIn("access.keys.laptop.dailyTokens needs tracking.enabled", str(caught.exception))
        self.load({"tracking": {"enabled": False}, "access": {"keys": {"laptop": ALICE}}})

    def test_environment_key_joins_the_table_as_default(self):
        config = self.load({"access": {"keys": {"laptop": ALICE}}}, {"PROXY_API_KEY": BOB})
        self.assertEqual([k.name for k in config.access_keys], ["laptop", "default"])
        self.assertEqual(config.access_keys[1].key, BOB)
        no_file = proxy.load_config(None, environ={"PROXY_API_KEY": BOB, "TARGET_API_KEY": "tk"},
                                    search_cwd=False)
        self.assertEqual(no_file.access_keys, (proxy.AccessKey("default", BOB),))
        self.assertEqual(no_file.target_api_key, "tk")
        with self.assertRaises(proxy.ConfigError) as caught:
            proxy.load_config(None, environ={"PROXY_API_KEY": "tooshort"}, search_cwd=False)
        self.assertIn("PROXY_API_KEY", str(caught.exception))
        self.assertNotIn("tooshort", str(caught.exception))

    def test_keyring_matches_every_key_and_nothing_else(self):
        ring = proxy.KeyRing(keys())
        self.assertEqual(ring.identify(ALICE).name, "alice")
        self.assertEqual(ring.identify(BOB).name, "bob")
        for guess in (WRONG, ALICE[:-1], ALICE + "x", "", ALICE.upper()):
            self.assertIsNone(ring.identify(guess), guess)
        self.assertFalse(proxy.KeyRing().required)


# --------------------------------------------------------------------------------------------------
# The check on every forwarded request
# --------------------------------------------------------------------------------------------------

class KeyCheckTests(unittest.TestCase):
    def setUp(self):
        self.upstream = start_upstream(self)
        self.app = "https://app.example"
        self.proxy = start_proxy(self, self.upstream.port, access_keys=keys(),
                                 target_api_key=BACKEND_KEY, allowed_origins=(self.app,))

    def tearDown(self):
        logged = LOG_BUFFER.getvalue()
        for secret in (ALICE, BOB, WRONG, BACKEND_KEY):
            self.assertNotIn(secret, logged)

    def assert_refused_401(self, status, headers, body):
        self.assertEqual(status, 401)
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], "authentication_error")
        self.assertIn("access key", body["error"]["message"])
        self.assertEqual(headers["content-type"], "application/json")
        self.assertIn("Bearer", headers["www-authenticate"])

    def test_missing_or_unknown_key_is_refused_and_never_reaches_the_backend(self):
        for label, headers in (("none", {}), ("unknown", {"Authorization": "Bearer " + WRONG}),
                               ("unknown x-api-key", {"x-api-key": WRONG}),
                               ("basic scheme", {"Authorization": "Basic " + ALICE}),
                               ("bearer without key", {"Authorization": "Bearer "})):
            with self.subTest(label):
                self.assert_refused_401(*post(self.proxy, "/v1/chat/completions", CHAT, headers))
        status, _, _ = post(self.proxy, "/api/tags", {}, {})
        self.assertEqual(status, 401)                       # any path, any API
        self.assertEqual(self.upstream.requests, [])
        stats = key_stats(self.proxy)
        self.assertEqual(stats["requests"], 0)
        self.assertEqual(stats["refused"], 6)
        self.assertEqual(stats["byKey"][proxy.STATS_NO_KEY]["refused"], 6)
        self.assertEqual(stats["byKey"]["alice"]["requests"], 0)   # listed although unused

    def test_bearer_in_any_case_or_x_api_key_is_accepted_and_replaced_by_the_backend_key(self):
        for label, headers in (("Bearer", {"Authorization": "Bearer " + ALICE}),
                               ("bearer", {"Authorization": "bearer " + ALICE}),
                               ("BEARER", {"authorization": "BEARER  " + BOB}),
                               ("x-api-key", {"X-Api-Key": BOB}),
                               ("both", {"x-api-key": WRONG, "Authorization": "Bearer " + ALICE})):
            with self.subTest(label):
                status, _, body = post(self.proxy, "/v1/chat/completions", CHAT, headers)
                self.assertEqual(status, 200)
                seen = self.upstream.requests[-1]
                self.assertEqual(seen.header("Authorization"), "Bearer " + BACKEND_KEY)
                self.assertIsNone(seen.header("x-api-key"))
                everything = json.dumps(seen.headers)
                self.assertNotIn(ALICE, everything)
                self.assertNotIn(BOB, everything)
        stats = settled_stats(self.proxy)
        self.assertEqual(stats["byKey"]["alice"]["requests"], 3)
        self.assertEqual(stats["byKey"]["bob"]["requests"], 2)

    def test_without_a_backend_key_no_credential_is_forwarded(self):
        upstream = start_upstream(self)
        server = start_proxy(self, upstream.port, access_keys=keys())
        status, _, _ = post(server, "/v1/messages", CHAT,
                            {"Authorization": "Bearer " + ALICE, "x-api-key": ALICE})
        self.assertEqual(status, 200)
        self.assertNotIn("authorization", upstream.requests[-1].header_names())
        self.assertNotIn("x-api-key", upstream.requests[-1].header_names())

    def test_without_keys_everything_passes_as_before(self):
        upstream = start_upstream(self)
        server = start_proxy(self, upstream.port)
        status, _, _ = post(server, "/v1/chat/completions", CHAT,
                            {"Authorization": "Bearer anything", "x-api-key": "whatever"})
        self.assertEqual(status, 200)
        self.assertEqual(upstream.requests[-1].header("Authorization"), "Bearer anything")
        self.assertEqual(upstream.requests[-1].header("x-api-key"), "whatever")
        self.assertNotIn("byKey", [k for k, v in settled_stats(server).items() if v])

    def test_backend_key_alone_replaces_the_clients_credentials(self):
        upstream = start_upstream(self)
        server = start_proxy(self, upstream.port, target_api_key=BACKEND_KEY)
        status, _, _ = post(server, "/v1/chat/completions", CHAT, {"x-api-key": "client-side"})
        self.assertEqual(status, 200)
        self.assertEqual(upstream.requests[-1].header("Authorization"), "Bearer " + BACKEND_KEY)
        self.assertIsNone(upstream.requests[-1].header("x-api-key"))

    def test_browser_can_read_the_401_and_preflights_need_no_key(self):
        conn = https(self.proxy)
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": self.app, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        preflight = conn.getresponse()
        preflight.read()
        self.assertEqual(preflight.status, 204)
        self.assertIn("authorization", preflight.getheader("Access-Control-Allow-Headers"))
        status, headers, body = post(self.proxy, "/v1/chat/completions", CHAT,
                                     {"Origin": self.app}, conn=conn)
        self.assert_refused_401(status, headers, body)
        self.assertEqual(headers["access-control-allow-origin"], self.app)
        self.assertIn("WWW-Authenticate", headers["access-control-expose-headers"])
        self.assertEqual(self.upstream.requests, [])

    def test_admin_plane_is_not_governed_by_access_keys(self):
        for path in ("/_proxy/stats", "/_proxy/health", "/_proxy/metrics", "/_proxy/dashboard"):
            conn = https(self.proxy)
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            conn.close()
            self.assertEqual(response.status, 200, path)

    def test_a_refused_body_is_drained_so_the_client_reads_the_answer(self):
        # http.client sends the whole body before reading: a proxy that answered and closed
        # would hand it a reset instead of the 401.
        conn = https(self.proxy)
        for size in (10, 2 << 20):
            big = {"messages": [{"role": "user", "content": "x" * size}]}
            status, headers, body = post(self.proxy, "/v1/chat/completions", big, conn=conn)
            self.assertEqual(status, 401)
            self.assertNotIn("connection", headers)
        status, _, _ = post(self.proxy, "/v1/chat/completions", CHAT,
                            {"Authorization": "Bearer " + ALICE}, conn=conn)
        self.assertEqual(status, 200)                       # the same connection goes on
        self.assertEqual(len(self.upstream.requests), 1)

    def test_a_client_waiting_for_100_continue_gets_the_refusal_at_once(self):
        sock = tls_socket(self.proxy)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n")
        answer = read_http_response(sock)
        sock.close()
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:80])
        self.assertIn(b"Connection: close", answer)
        self.assertNotIn(b"100 Continue", answer)

    @unittest.skipIf(shutil.which("curl") is None, "curl is not installed")
    def test_curl_without_a_key_gets_a_json_401(self):
        url = "https://localhost:%d/v1/chat/completions" % self.proxy.server_address[1]
        result = subprocess.run(
            ["curl", "-sS", "--cacert", ca_file(), "-w", "\n%{http_code}", "-H",
             "Content-Type: application/json", "-d", json.dumps(CHAT), url],
            capture_output=True, timeout=30, check=True)
        body, _, code = result.stdout.decode().rpartition("\n")
        self.assertEqual(code, "401")
        self.assertEqual(json.loads(body)["error"]["type"], "authentication_error")
        ok = subprocess.run(
            ["curl", "-sS", "--cacert", ca_file(), "-w", "\n%{http_code}", "-H",
             "Authorization: Bearer " + ALICE, "-d", json.dumps(CHAT), url],
            capture_output=True, timeout=30, check=True)
        self.assertEqual(ok.stdout.decode().rpartition("\n")[2], "200")

    def test_metrics_carry_names_never_keys(self):
        post(self.proxy, "/v1/chat/completions", CHAT, {"Authorization": "Bearer " + ALICE})
        post(self.proxy, "/v1/chat/completions", CHAT, {"Authorization": "Bearer " + WRONG})
        settled_stats(self.proxy)
        text = proxy.render_metrics(self.proxy.stats)
        self.assertIn('llm_proxy_key_requests_total{key="alice"} 1', text)
        self.assertIn('llm_proxy_key_refused_total{key="%s"} 1' % proxy.STATS_NO_KEY, text)
        self.assertIn("llm_proxy_refused_total 1", text)
        for secret in (ALICE, BOB, WRONG, BACKEND_KEY):
            self.assertNotIn(secret, text)
            self.assertNotIn(secret, json.dumps(self.proxy.stats.snapshot(keys=keys())))


# --------------------------------------------------------------------------------------------------
# The official SDKs
# --------------------------------------------------------------------------------------------------

@unittest.skipIf(openai is None or anthropic is None, "the openai and anthropic SDKs are needed")
class SdkAccessTests(unittest.TestCase):
    def setUp(self):
        self.llm = FakeLLM()
        self.upstream = start_upstream(self, self.llm)
        self.proxy = start_proxy(self, self.upstream.port, access_keys=keys(),
                                 target_api_key=BACKEND_KEY)
        self.base = "https://localhost:%d" % self.proxy.server_address[1]

    def openai_client(self, key):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key,
                             http_client=strict_http_client(openai), max_retries=0)

    def anthropic_client(self, key, header="x-api-key"):
        if header == "x-api-key":       # what older SDKs send for api_key (newer: Bearer)
            with mock.patch.dict(os.environ, {}, clear=False):
                os.environ.pop("ANTHROPIC_API_KEY", None)
                os.environ.pop("ANTHROPIC_AUTH_TOKEN", None)
                return anthropic.Anthropic(base_url=self.base, default_headers={"x-api-key": key},
                                           http_client=strict_http_client(anthropic), max_retries=0)
        return anthropic.Anthropic(base_url=self.base, api_key=key,
                                   http_client=strict_http_client(anthropic), max_retries=0)

    def test_openai_sdk_with_a_valid_and_a_wrong_key(self):
        done = self.openai_client(ALICE).chat.completions.create(**CHAT)
        self.assertEqual(done.choices[0].message.content, "Hello from the fake model.")
        with self.assertRaises(openai.AuthenticationError) as caught:
            self.openai_client(WRONG).chat.completions.create(**CHAT)
        self.assertEqual(caught.exception.status_code, 401)
        self.assertIn("this proxy needs an access key", str(caught.exception))
        self.assertEqual(len(self.upstream.requests), 1)

    def test_anthropic_sdk_with_x_api_key_and_with_api_key(self):
        for header in ("x-api-key", "api_key"):
            with self.subTest(header):
                message = self.anthropic_client(BOB, header).messages.create(
                    model="claude-haiku-4-5-20251001", max_tokens=20,
                    messages=[{"role": "user", "content": "Hi"}])
                self.assertEqual(message.content[0].text, "Hello from the fake model.")
                self.assertEqual(self.upstream.requests[-1].header("Authorization"),
                                 "Bearer " + BACKEND_KEY)
                with self.assertRaises(anthropic.AuthenticationError) as caught:
                    self.anthropic_client(WRONG, header).messages.create(
                        model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
                self.assertIn("this proxy needs an access key", str(caught.exception))
        self.assertEqual(len(self.upstream.requests), 2)

    def test_per_key_stats_are_exact_across_streamed_and_plain_calls(self):
        alice = self.openai_client(ALICE)
        alice.chat.completions.create(**CHAT)
        list(alice.chat.completions.create(stream=True, **CHAT))
        list(alice.chat.completions.create(model="m2", stream=True, messages=[
            {"role": "user", "content": "a longer prompt for other numbers"}]))
        settled_stats(self.proxy)
        after_alice = dict(self.llm.emitted)
        bob = self.anthropic_client(BOB)
        bob.messages.create(model="claude-haiku-4-5-20251001", max_tokens=9,
                            messages=[{"role": "user", "content": "Hi"}])
        with bob.messages.stream(model="claude-haiku-4-5-20251001", max_tokens=9,
                                 messages=[{"role": "user", "content": "Hi there"}]) as stream:
            "".join(stream.text_stream)
        stats = settled_stats(self.proxy)
        a, b = stats["byKey"]["alice"], stats["byKey"]["bob"]
        self.assertEqual((a["requests"], a["prompt"], a["completion"], a["cacheRead"]),
                         (3, after_alice["prompt"], after_alice["completion"],
                          after_alice["cacheRead"]))
        self.assertEqual(a["total"], a["prompt"] + a["completion"])
        self.assertEqual((b["requests"], b["prompt"], b["completion"], b["cacheRead"],
                          b["cacheWrite"]),
                         (2, self.llm.emitted["prompt"] - after_alice["prompt"],
                          self.llm.emitted["completion"] - after_alice["completion"], 200, 40))
        self.assertEqual(a["today"], a["total"])
        self.assertEqual(b["today"], b["total"])
        self.assertEqual(a["errors"] + b["errors"], 0)
        self.assertIsNotNone(a["lastUsed"])
        self.assertEqual(stats["tokens"]["total"], a["total"] + b["total"])
        self.assertEqual([r["key"] for r in stats["recent"]], ["bob"] * 2 + ["alice"] * 3)


# --------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------

class BudgetTests(unittest.TestCase):
    def setUp(self):
        self.llm = FakeLLM()
        self.upstream = start_upstream(self, self.llm)
        self.dir = tempfile.mkdtemp(prefix="llm-proxy-budget-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.stats_file = os.path.join(self.dir, "stats.json")
        # 23:59:00 local time: 60 s before the budget renews.
        self.clock = Clock(local_time(2026, 11, 27, 23, 59, 0))

    def start(self, **limits):
        store = proxy.StatsStore(path=self.stats_file, clock=self.clock)
        store.load()
        return start_proxy_with_store(self, self.upstream.port, store,
                                      stats_file=self.stats_file, access_keys=keys(**limits))

    def alice(self, server, conn=None):
        return post(server, "/v1/chat/completions", CHAT, {"Authorization": "Bearer " + ALICE},
                    conn=conn)

    def test_daily_budget_lets_the_last_request_finish_then_refuses_until_midnight(self):
        server = self.start(daily_tokens=60)
        self.assertEqual(self.alice(server)[0], 200)     # 51 tokens: under budget
        self.assertEqual(self.alice(server)[0], 200)     # starts under, ends at 102: finishes
        settled_stats(server)
        status, headers, body = self.alice(server)
        self.assertEqual(status, 429)
        self.assertEqual(body["error"]["type"], "rate_limit_error")
        self.assertIn("daily budget of 60 tokens", body["error"]["message"])
        self.assertEqual(headers["retry-after"], "60")
        self.assertEqual(headers["x-should-retry"], "false")
        self.assertEqual(len(self.upstream.requests), 2)  # the overshoot is one request
        self.assertEqual(post(server, "/v1/chat/completions", CHAT,
                              {"Authorization": "Bearer " + BOB})[0], 200)   # bob is unaffected
        stats = key_stats(server)
        self.assertEqual(stats["byKey"]["alice"]["refused"], 1)
        self.assertEqual(stats["byKey"]["alice"]["today"], 102)
        self.assertEqual(stats["byKey"]["alice"]["total"], 102)
        self.assertEqual(stats["byKey"]["alice"]["dailyTokens"], 60)
        self.clock.now += 61                              # 00:00:01 the next day
        self.assertEqual(self.alice(server)[0], 200)
        self.assertEqual(settled_stats(server)["byKey"]["alice"]["today"], 51)

    def test_budgets_survive_a_restart_and_a_stats_reset(self):
        server = self.start(daily_tokens=10)
        self.assertEqual(self.alice(server)[0], 200)
        settled_stats(server)
        server.stats.reset()                              # stats start over, the budget does not
        self.assertEqual(self.alice(server)[0], 429)
        self.assertEqual(post(server, "/v1/chat/completions", CHAT,
                              {"x-api-key": BOB})[0], 200)
        settled_stats(server)
        self.assertTrue(server.stats.save())
        again = self.start(daily_tokens=10)
        self.assertEqual(self.alice(again)[0], 429)
        self.assertEqual(again.stats.key_tokens_today("alice")[0],
                         server.stats.key_tokens_today("alice")[0])
        self.assertEqual(again.stats.snapshot()["byKey"]["alice"]["refused"], 2)
        self.assertEqual(again.stats.snapshot()["recent"][0]["key"], "bob")
        with open(self.stats_file) as handle:
            saved = handle.read()
        self.assertIn('"alice"', saved)
        self.assertNotIn(ALICE, saved)

    def test_requests_per_minute(self):
        server = self.start(requests_per_minute=2)
        ticks = Clock(1000.0)
        server.rate_limiter = proxy.RateLimiter(clock=ticks)
        conn = https(server)
        self.assertEqual(self.alice(server, conn)[0], 200)
        ticks.now += 20
        self.assertEqual(self.alice(server, conn)[0], 200)
        ticks.now += 10
        status, headers, body = self.alice(server, conn)
        self.assertEqual(status, 429)
        self.assertEqual(headers["retry-after"], "30")      # the first start leaves the window
        self.assertNotIn("x-should-retry", headers)         # worth retrying after Retry-After
        self.assertIn("2 requests per minute", body["error"]["message"])
        ticks.now += 30
        self.assertEqual(self.alice(server, conn)[0], 200)
        self.assertEqual(len(self.upstream.requests), 3)

    @unittest.skipIf(openai is None or anthropic is None, "the openai and anthropic SDKs are needed")
    def test_sdks_raise_rate_limit_error_with_retry_after(self):
        server = self.start(daily_tokens=1)
        base = "https://localhost:%d" % server.server_address[1]
        client = openai.OpenAI(base_url=base + "/v1", api_key=ALICE,
                               http_client=strict_http_client(openai), max_retries=0)
        client.chat.completions.create(**CHAT)
        settled_stats(server)
        with self.assertRaises(openai.RateLimitError) as caught:
            client.chat.completions.create(**CHAT)
        self.assertEqual(caught.exception.response.headers["retry-after"], "60")
        self.assertIn("daily budget", str(caught.exception))
        claude = anthropic.Anthropic(base_url=base, api_key=ALICE,
                                     http_client=strict_http_client(anthropic), max_retries=0)
        with self.assertRaises(anthropic.RateLimitError) as caught:
            claude.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        self.assertEqual(caught.exception.response.headers["retry-after"], "60")
        # With the SDKs' default retries, x-should-retry stops them from asking again.
        retrying = openai.OpenAI(base_url=base + "/v1", api_key=ALICE,
                                 http_client=strict_http_client(openai), max_retries=2)
        with self.assertRaises(openai.RateLimitError):
            retrying.chat.completions.create(**CHAT)
        self.assertEqual(settled_stats(server)["byKey"]["alice"]["refused"], 3)
        self.assertEqual(len(self.upstream.requests), 1)


# --------------------------------------------------------------------------------------------------
# The command line, and the proxy as a real process (SIGHUP, what it writes)
# --------------------------------------------------------------------------------------------------

def run_cli(*args, env=None):
    return subprocess.run([sys.executable, PROXY_PY] + list(args), capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, **(env or {})))


class KeyCommandLineTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="llm-proxy-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "config.json")

    def printed_key(self, output):
        lines = [line.strip() for line in output.splitlines() if line.startswith("    sk-")]
        self.assertEqual(len(lines), 1, output)
        return lines[0]

    def test_add_key_creates_a_missing_config_and_prints_the_snippets(self):
        result = run_cli("--config", self.path, "--add-key", "laptop", "--daily-tokens", "50000",
                         "--requests-per-minute", "30")
        self.assertEqual(result.returncode, 0, result.stderr)
        secret = self.printed_key(result.stdout)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        config = proxy.load_config(self.path, environ={})
        self.assertEqual(config.access_keys, (proxy.AccessKey("laptop", secret, 50000, 30),))
        self.assertGreaterEqual(len(secret), 40)
        out = result.stdout
        self.assertRegex(out, r'OpenAI\(base_url="https://[^"]+:8443/v1", api_key="%s"\)' % secret)
        self.assertRegex(out, r'Anthropic\(base_url="https://[^"/]+:8443", api_key="%s"\)' % secret)
        self.assertIn("SIGHUP", out)
        second = run_cli("--config", self.path, "--add-key", "phone")
        self.assertNotEqual(self.printed_key(second.stdout), secret)   # random each time

    def test_add_key_keeps_the_rest_of_an_existing_config(self):
        original = {"target": {"port": 8080, "host": "192.0.2.7"}, "proxy": {"port": 9443},
                    "access": {"keys": {"zeta": ALICE, "alpha": {"key": BOB, "dailyTokens": 9}}},
                    "tracking": {"historySize": 7}}
        with open(self.path, "w") as handle:
            json.dump(original, handle)
        os.chmod(self.path, 0o644)
        result = run_cli("--config", self.path, "--add-key", "mid")
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(self.path) as handle:
            now = json.load(handle)
        self.assertEqual(list(now), ["target", "proxy", "access", "tracking"])
        self.assertEqual(list(now["access"]["keys"]), ["zeta", "alpha", "mid"])
        del now["access"]["keys"]["mid"]
        self.assertEqual(now, original)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertIn(":9443/v1", result.stdout)
        refused = run_cli("--config", self.path, "--add-key", "zeta")
        self.assertEqual(refused.returncode, 2)
        self.assertIn("already has an access key named 'zeta'", refused.stderr)
        removed = run_cli("--config", self.path, "--remove-key", "zeta")
        self.assertEqual(removed.returncode, 0, removed.stderr)
        self.assertEqual([k.name for k in proxy.load_config(self.path, environ={}).access_keys],
                         ["alpha", "mid"])
        self.assertEqual(run_cli("--config", self.path, "--remove-key", "zeta").returncode, 2)

    def test_add_key_leaves_an_invalid_config_untouched(self):
        cases = {"invalid JSON": b'{"proxy": {"port": 8443,}}',
                 "invalid value": b'{"proxy": {"port": "8443x"}}',
                 "invalid key table": b'{"access": {"keys": {"a": "short"}}}'}
        for label, content in cases.items():
            with self.subTest(label):
                with open(self.path, "wb") as handle:
                    handle.write(content)
                result = run_cli("--config", self.path, "--add-key", "laptop")
                self.assertEqual(result.returncode, 2)
                self.assertIn(self.path, result.stderr)
                self.assertTrue(result.stderr.startswith("error: "), result.stderr)
                self.assertNotIn("Traceback", result.stderr)
                with open(self.path, "rb") as handle:
                    self.assertEqual(handle.read(), content)
                self.assertEqual(sorted(os.listdir(self.dir)), ["config.json"])
        alone = run_cli("--config", self.path, "--daily-tokens", "5")
        self.assertEqual(alone.returncode, 2)
        self.assertIn("go with --add-key", alone.stderr)
        bad_name = run_cli("--config", os.path.join(self.dir, "new.json"), "--add-key", "my laptop")
        self.assertEqual(bad_name.returncode, 2)
        self.assertIn("--add-key", bad_name.stderr)

    def test_list_keys_shows_names_budgets_and_todays_use_never_a_key(self):
        with open(self.path, "w") as handle:
            json.dump({"access": {"keys": {"alice": {"key": ALICE, "dailyTokens": 5000},
                                           "bob": BOB}}}, handle)
        store = proxy.StatsStore(path=os.path.join(self.dir, "stats.json"))
        store.record(proxy.RequestRecord(time=time.time(), method="POST",
                                         path="/v1/chat/completions", status=200,
                                         usage={"prompt": 1200, "completion": 34}, key="alice"))
        store.record_refusal("bob")
        self.assertTrue(store.save())
        result = run_cli("--config", self.path, "--list-keys")
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
        self.assertEqual(rows["alice"][1:5], ["1,234", "5,000", "-", "1"])
        self.assertEqual(rows["bob"][1:6], ["0", "-", "-", "0", "1"])
        self.assertNotIn(ALICE, result.stdout)
        self.assertNotIn(BOB, result.stdout)


def free_port_proxy_config(directory, upstream_port, **extra):
    document = {"proxy": {"port": 0, "bind": "127.0.0.1"},
                "target": {"host": "127.0.0.1", "port": upstream_port, "apiKey": BACKEND_KEY},
                "tls": {"cert": os.path.join(certs_dir(), "cert.pem"),
                        "key": os.path.join(certs_dir(), "key.pem")},
                "tracking": {"persistInterval": 0.2},
                "access": {"keys": {"alice": ALICE}}}
    document.update(extra)
    path = os.path.join(directory, "config.json")
    with open(path, "w") as handle:
        json.dump(document, handle)
    return path


class LiveProcessTests(unittest.TestCase):
    """proxy.py as users run it: --add-key and SIGHUP while it serves; then grep what it wrote."""

    def setUp(self):
        self.llm = FakeLLM()
        self.upstream = start_upstream(self, self.llm)
        self.dir = tempfile.mkdtemp(prefix="llm-proxy-live-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.config = free_port_proxy_config(self.dir, self.upstream.port)
        self.log = os.path.join(self.dir, "proxy.log")
        self.process = subprocess.Popen(
            [sys.executable, PROXY_PY, "--config", self.config, "--log-file", self.log,
             "--log-level", "debug"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(self.stop)
        self.assertTrue(wait_until(lambda: "listening on https://" in self.read_log(), 20),
                        self.read_log())
        line = [l for l in self.read_log().splitlines() if "listening on https://" in l][0]
        self.port = int(line.split("listening on https://")[1].split(",")[0].rsplit(":", 1)[1])

    def read_log(self):
        try:
            with open(self.log, encoding="utf-8") as handle:
                return handle.read()
        except OSError:
            return ""

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.output = self.process.communicate()

    def request(self, key, conn=None, stream=False):
        import http.client
        conn = conn or http.client.HTTPSConnection("localhost", self.port,
                                                   context=ssl.create_default_context(cafile=ca_file()),
                                                   timeout=10)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(dict(CHAT, stream=stream)),
                     headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status, conn

    def test_sighup_loads_a_new_key_without_dropping_connections_and_no_key_is_written(self):
        status, kept = self.request(ALICE)
        self.assertEqual(status, 200)
        self.assertEqual(self.request(ALICE, stream=True)[0], 200)
        self.assertEqual(self.request(WRONG)[0], 401)
        added = run_cli("--config", self.config, "--add-key", "tablet", "--daily-tokens", "100000")
        self.assertEqual(added.returncode, 0, added.stderr)
        tablet = [l.strip() for l in added.stdout.splitlines() if l.startswith("    sk-")][0]
        self.assertEqual(self.request(tablet)[0], 401)            # not loaded yet
        self.process.send_signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: "reloaded access keys" in self.read_log(), 10))
        self.assertIn("alice, tablet", self.read_log())
        self.assertEqual(self.request(tablet)[0], 200)
        self.assertEqual(self.request(ALICE, conn=kept)[0], 200)   # the old connection lives on
        removed = run_cli("--config", self.config, "--remove-key", "alice")
        self.assertEqual(removed.returncode, 0, removed.stderr)
        self.process.send_signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: "reloaded access keys (SIGHUP): tablet" in self.read_log(), 10))
        self.assertEqual(self.request(ALICE, conn=kept)[0], 401)
        kept.close()
        # A broken config on SIGHUP keeps the keys in force.
        with open(self.config, "w") as handle:
            handle.write("{not json")
        self.process.send_signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: "kept the previous access keys" in self.read_log(), 10))
        self.assertEqual(self.request(tablet)[0], 200)
        self.stop()
        self.assertEqual(self.process.returncode, 0)
        # The backend saw its own key only.
        for seen in self.upstream.requests:
            self.assertEqual(seen.header("Authorization"), "Bearer " + BACKEND_KEY)
        # No client key in any line logged or file written (the config file holds them on purpose).
        written = {}
        for folder, _, names in os.walk(self.dir):
            for name in names:
                path = os.path.join(folder, name)
                if path != self.config:
                    with open(path, "rb") as handle:
                        written[path] = handle.read()
        self.assertIn(self.log, written)
        self.assertIn(os.path.join(self.dir, "stats.json"), written)
        written["stdout"], written["stderr"] = self.output
        for secret in (ALICE, WRONG, tablet, BACKEND_KEY):
            for where, data in written.items():
                self.assertNotIn(secret.encode(), data, where)
        stats = json.loads(written[os.path.join(self.dir, "stats.json")])
        self.assertEqual(stats["byKey"]["alice"]["requests"], 3)
        self.assertEqual(stats["byKey"]["tablet"]["requests"], 2)
        self.assertEqual(stats["refused"], 3)


# --------------------------------------------------------------------------------------------------
# A browser app on another origin
# --------------------------------------------------------------------------------------------------

def browser_missing():
    if browser.find_chromium() is None:
        return "Chromium is not installed (apt-get install chromium)"
    if shutil.which("certutil") is None:
        return "certutil is not installed (apt-get install libnss3-tools)"
    return None


FETCH = """fetch(%s, {method: "POST", headers: Object.assign({"Content-Type": "application/json"}, %s),
  body: JSON.stringify({model: "m", messages: [{role: "user", content: "hi"}]})})
  .then(r => r.json().then(b => ({status: r.status, body: b, retry: r.headers.get("retry-after")})))
  .catch(e => ({failed: String(e)}))"""


@unittest.skipIf(browser_missing(), browser_missing())
class BrowserAccessTests(unittest.TestCase):
    def test_fetch_from_another_allowed_origin_with_and_without_the_key(self):
        llm = FakeLLM()
        upstream = start_upstream(self, llm)
        page_server = start_proxy(self, start_upstream(self).port)   # serves the "app" origin
        app = "https://localhost:%d" % page_server.server_address[1]
        guarded = start_proxy(self, upstream.port, access_keys=keys(daily_tokens=1),
                              allowed_origins=(app,))
        url = json.dumps("https://localhost:%d/v1/chat/completions" % guarded.server_address[1])
        work = tempfile.mkdtemp(prefix="llm-proxy-browser-")
        self.addCleanup(shutil.rmtree, work, True)
        with browser.Browser(browser.make_trust_home(ca_file(), work)) as chromium:
            tab = chromium.new_tab()
            self.assertIsNone(tab.navigate(app + "/_proxy/health"))   # JSON page: no CSP
            self.assertTrue(tab.wait_for("document.readyState === 'complete'"))
            ok = tab.evaluate(FETCH % (url, json.dumps({"Authorization": "Bearer " + ALICE})), True)
            settled_stats(guarded)
            refused = tab.evaluate(FETCH % (url, "{}"), True)
            over = tab.evaluate(FETCH % (url, json.dumps({"x-api-key": ALICE})), True)
            tab.close()
            settled_stats(guarded)
            setup, _ = browser.load_page(
                chromium, "https://localhost:%d/_proxy/" % guarded.server_address[1],
                browser.SETUP_READY)
            artifacts = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
            dashboard, _ = browser.load_page(
                chromium, "https://localhost:%d/_proxy/dashboard" % guarded.server_address[1],
                browser.DASHBOARD_READY, screenshot=os.path.join(artifacts, "dashboard-keys.png"),
                full_page=True)
        self.assertEqual(setup.problems(), [])
        self.assertIn('-H "Authorization: Bearer <your access key>"', setup.text)
        self.assertEqual(dashboard.problems(), [])
        self.assertIn("By access key", dashboard.text)
        today = guarded.stats.key_tokens_today("alice")[0]
        self.assertRegex(dashboard.text, r"alice\s+%s\s+1\s" % "{:,}".format(today))
        self.assertIn(proxy.STATS_NO_KEY, dashboard.text)
        self.assertIn("127.0.0.1 \u00b7 alice", dashboard.text)          # recent requests
        self.assertNotIn(ALICE, dashboard.text)
        self.assertEqual(ok.get("status"), 200, ok)
        self.assertEqual(ok["body"]["choices"][0]["message"]["content"], "Hello from the fake model.")
        self.assertEqual(refused.get("status"), 401, refused)
        self.assertIn("this proxy needs an access key", refused["body"]["error"]["message"])
        self.assertEqual(over.get("status"), 429, over)
        self.assertEqual(over["body"]["error"]["type"], "rate_limit_error")
        self.assertTrue(over["retry"] and int(over["retry"]) > 0, over)
        self.assertEqual(len(upstream.requests), 1)


if __name__ == "__main__":
    unittest.main()
