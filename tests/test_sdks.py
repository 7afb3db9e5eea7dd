"""The official OpenAI and Anthropic Python SDKs as real clients, with strict certificate checks.

Skipped when the SDKs are not installed (.ci/run installs them).
"""

import socket
import ssl
import unittest

from support import optional_import, FakeLLM, start_upstream, start_proxy, ca_file, settled_stats

openai = optional_import("openai")          # the official SDKs; their tests skip without them
anthropic = optional_import("anthropic")


def strict_http_client(sdk):
    """The SDK's own HTTP client class, trusting only the test CA with X.509 strict checks."""
    context = ssl.create_default_context(cafile=ca_file())
    context.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
    return sdk.DefaultHttpxClient(verify=context, timeout=10)


def dead_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@unittest.skipIf(openai is None, "the openai SDK is not installed (pip install openai)")
class OpenAISdkTests(unittest.TestCase):
    def setUp(self):
        self.llm = FakeLLM()
        self.upstream = start_upstream(self, self.llm)
        self.proxy = start_proxy(self, self.upstream.port)
        self.client = openai.OpenAI(
            base_url="https://localhost:%d/v1" % self.proxy.server_address[1],
            api_key="sk-test-not-a-secret", http_client=strict_http_client(openai), max_retries=0)

    def test_chat_completion(self):
        completion = self.client.chat.completions.create(
            model="qwen3:8b", messages=[{"role": "user", "content": "Say hello"}])
        self.assertEqual(completion.choices[0].message.content, "Hello from the fake model.")
        self.assertEqual(completion.usage.completion_tokens, 6)
        self.assertEqual(self.upstream.requests[-1].header("Authorization"),
                         "Bearer sk-test-not-a-secret")

    def test_streamed_chat_completion_looks_untouched_and_is_counted(self):
        stream = self.client.chat.completions.create(
            model="qwen3:8b", messages=[{"role": "user", "content": "Say hello"}], stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "Hello from the fake model.")
        self.assertTrue(all(c.choices for c in chunks), "the injected usage chunk leaked")
        self.assertTrue(all(c.usage is None for c in chunks))
        snapshot = settled_stats(self.proxy)
        self.assertEqual(snapshot["tokens"]["completion"], 6)
        self.assertEqual(snapshot["usageReports"]["injected"], 1)

    def test_models_list(self):
        models = self.client.models.list()
        self.assertEqual([m.id for m in models.data], ["test-model"])

    def test_backend_down_surfaces_the_proxys_message(self):
        down = start_proxy(self, dead_port())
        client = openai.OpenAI(base_url="https://localhost:%d/v1" % down.server_address[1],
                               api_key="x", http_client=strict_http_client(openai), max_retries=0)
        with self.assertRaises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        self.assertEqual(caught.exception.status_code, 502)
        self.assertIn("Cannot connect to http://127.0.0.1", caught.exception.message)

    def test_an_sdk_without_the_ca_refuses_the_proxy(self):
        client = openai.OpenAI(base_url="https://localhost:%d/v1" % self.proxy.server_address[1],
                               api_key="x", max_retries=0)
        with self.assertRaises(openai.APIConnectionError):
            client.models.list()


@unittest.skipIf(anthropic is None,
                 "the anthropic SDK is not installed (pip install anthropic)")
class AnthropicSdkTests(unittest.TestCase):
    def setUp(self):
        self.llm = FakeLLM()
        self.upstream = start_upstream(self, self.llm)
        self.proxy = start_proxy(self, self.upstream.port)
        self.client = anthropic.Anthropic(
            base_url="https://localhost:%d" % self.proxy.server_address[1],
            api_key="sk-ant-test-not-a-secret", http_client=strict_http_client(anthropic), max_retries=0)

    def test_message(self):
        message = self.client.messages.create(
            model="claude-haiku-4-5-20251001", max_tokens=20,
            messages=[{"role": "user", "content": "Hi"}])
        self.assertEqual(message.content[0].text, "Hello from the fake model.")
        # Older SDKs send x-api-key, newer ones Authorization: Bearer; either must arrive as sent.
        seen = self.upstream.requests[-1]
        self.assertIn("sk-ant-test-not-a-secret",
                      (seen.header("x-api-key") or "") + (seen.header("Authorization") or ""))
        snapshot = settled_stats(self.proxy)
        self.assertEqual(snapshot["tokens"]["cacheRead"], 100)
        self.assertEqual(snapshot["tokens"]["prompt"], self.llm.emitted["prompt"])

    def test_streamed_message(self):
        with self.client.messages.stream(
                model="claude-haiku-4-5-20251001", max_tokens=20,
                messages=[{"role": "user", "content": "Hi"}]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual(text, "Hello from the fake model.")
        self.assertEqual(final.usage.output_tokens, 6)
        snapshot = settled_stats(self.proxy)
        self.assertEqual(snapshot["tokens"]["completion"], 6)
        self.assertEqual(snapshot["tokens"]["cacheWrite"], 20)
        self.assertEqual(snapshot["usageReports"]["reported"], 1)

    def test_backend_down_surfaces_the_proxys_message(self):
        down = start_proxy(self, dead_port())
        client = anthropic.Anthropic(base_url="https://localhost:%d" % down.server_address[1],
                                     api_key="x", http_client=strict_http_client(anthropic), max_retries=0)
        with self.assertRaises(anthropic.APIStatusError) as caught:
            client.messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "x"}])
        self.assertEqual(caught.exception.status_code, 502)
        self.assertIn("Cannot connect", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
