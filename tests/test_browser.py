"""The dashboard and set-up page in a real headless Chromium, after real traffic through the proxy.

Chromium trusts the test CA through an NSS database (never --ignore-certificate-errors), so this
also proves the generated certificate is acceptable to Chromium; the negative (no CA, no page) is
checked too. Screenshots go to tests/artifacts/ (git-ignored). Skipped, with a message, where
Chromium or certutil is missing; .ci/run installs both (Debian: chromium, libnss3-tools).
"""

import json
import os
import unittest

import browser
from support import FakeLLM, HERE, ca_file, https, settled_stats, start_proxy, start_upstream

ARTIFACTS = os.path.join(HERE, "artifacts")
HOSTILE_MODEL = "<img src=x onerror=alert(1)>"
HOSTILE_PATH = '/v1/"><script>alert(2)</script>'


def missing_tools():
    if browser.find_chromium() is None:
        return "Chromium is not installed (apt-get install chromium)"
    if not any(os.access(os.path.join(d, "certutil"), os.X_OK)
               for d in os.environ.get("PATH", "").split(os.pathsep)):
        return "certutil is not installed (apt-get install libnss3-tools)"
    return None


@unittest.skipIf(missing_tools(), missing_tools())
class DashboardInChromiumTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        os.makedirs(ARTIFACTS, exist_ok=True)

    def setUp(self):
        self.llm = FakeLLM()
        self.upstream = start_upstream(self, self.llm)
        self.proxy = start_proxy(self, self.upstream.port)
        self.base = "https://localhost:%d" % self.proxy.server_address[1]
        self.send_traffic()

    def post(self, path, payload):
        conn = https(self.proxy)
        conn.request("POST", path, body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status

    def send_traffic(self):
        chat = {"messages": [{"role": "user", "content": "hello there"}]}
        self.post("/v1/chat/completions", dict(chat, model="qwen3:8b", stream=True))
        self.post("/v1/chat/completions", dict(chat, model="qwen3:8b"))
        self.post("/v1/messages", dict(chat, model="claude-haiku-4-5-20251001", max_tokens=9,
                                       stream=True))
        self.post("/api/chat", dict(chat, model="llama3.2"))
        # Hostile values: a model name from the backend and a path from a client.
        self.post("/v1/chat/completions", dict(chat, model=HOSTILE_MODEL))
        self.assertEqual(self.post(HOSTILE_PATH, chat), 404)
        settled_stats(self.proxy)

    def test_dashboard_shows_the_real_totals_and_no_injected_markup(self):
        total = self.llm.emitted["prompt"] + self.llm.emitted["completion"]
        home = browser.make_trust_home(ca_file(), self.tmpdir())
        with browser.Browser(home) as chromium:
            result, _ = browser.load_page(chromium, self.base + "/_proxy/dashboard",
                                          browser.DASHBOARD_READY,
                                          screenshot=os.path.join(ARTIFACTS, "dashboard.png"),
                                          full_page=True)
            phone, _ = browser.load_page(chromium, self.base + "/_proxy/dashboard",
                                         browser.DASHBOARD_READY, width=390, height=844,
                                         mobile=True, dark=True, user_agent=browser.IPHONE_UA,
                                         screenshot=os.path.join(ARTIFACTS, "dashboard-phone.png"))
        self.assertEqual(result.problems(), [])
        self.assertEqual(phone.problems(), [])
        self.assertIn("{:,}".format(total), result.text)
        for name in ("qwen3:8b", "claude-haiku-4-5-20251001", "llama3.2", "/api/chat"):
            self.assertIn(name, result.text)
        # The hostile strings are shown as text, and nothing they contain ran or was parsed.
        self.assertIn(HOSTILE_MODEL, result.text)
        self.assertIn(HOSTILE_PATH, result.text)
        self.assertEqual(result.alerts(), [])
        self.assertEqual(result.probe.get("img"), 0)

    def test_setup_page_and_the_reset_button(self):
        home = browser.make_trust_home(ca_file(), self.tmpdir())
        with browser.Browser(home) as chromium:
            setup, _ = browser.load_page(chromium, self.base + "/_proxy/", browser.SETUP_READY,
                                         screenshot=os.path.join(ARTIFACTS, "setup.png"))
            reset = browser.check_reset(chromium, self.base)
        self.assertEqual(setup.problems(), [])
        self.assertIn(self.base + "/v1", setup.text)
        self.assertIn("reachable", setup.text)
        self.assertEqual(reset["errors"], [])
        self.assertEqual(settled_stats(self.proxy)["requests"], 0)

    def test_without_the_ca_chromium_refuses_the_page(self):
        error = browser.check_untrusted(self.base + "/_proxy/dashboard", self.tmpdir())
        self.assertIsNotNone(error, "Chromium loaded the page without trusting the CA")
        self.assertIn("CERT", error.upper())

    def tmpdir(self):
        import shutil
        import tempfile
        path = tempfile.mkdtemp(prefix="llm-proxy-browser-")
        self.addCleanup(shutil.rmtree, path, True)
        return path


if __name__ == "__main__":
    unittest.main()
