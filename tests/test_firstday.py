"""The first day of a new user, followed literally (issue 12): README, banner, set-up page, CLI.

The base URL each kind of client needs comes from one table (proxy.CLIENT_FAMILIES); here the
table's snippets are run with the real SDKs against the proxy and a fake backend, README is
checked against the table, every shell command in README's code blocks is run (or skipped with
a reason kept below), and the cron line is run as cron runs it: from `/`, with a bare PATH, on a
folder that holds nothing but proxy.py.
"""

import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request
import uuid
from contextlib import redirect_stdout

from support import optional_import
# The marker test_service.py kills leftovers by, and its process helpers.
from test_service import _LISTENING, _MARKER_VAR, _alive, _pids_with_marker
from support import (FakeLLM, ROOT, ca_file, certs_dir, client_context, https, proxy,
                     start_proxy, start_upstream, wait_until)

openai = optional_import("openai")          # the official SDKs; their tests skip without them
anthropic = optional_import("anthropic")

README = os.path.join(ROOT, "README.md")
PROXY_PY = os.path.join(ROOT, "proxy.py")
FAMILIES = {family.key: family for family in proxy.CLIENT_FAMILIES}
README_ORIGIN = "https://<proxy>:8443"
_SCRUBBED_ENV = ("PROXY_PORT", "TARGET_HOST", "TARGET_PORT", "CERT_FILE", "KEY_FILE",
                 "ALLOWED_ORIGINS", "TLS_HOSTS", "PROXY_API_KEY", "TARGET_API_KEY",
                 "JOURNAL_STREAM", "NOTIFY_SOCKET",
                 "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS")
START_TIMEOUT = 60.0


def _read(path):
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def readme_text():
    with open(README, encoding="utf-8") as handle:
        return handle.read()


def readme_blocks(text=None):
    """(language, body) of every fenced code block in README.md (or `text`), in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text or readme_text(), re.S | re.M)


def readme_section(title):
    """The text of README's `## title` section."""
    return readme_text().split("\n## %s\n" % title, 1)[1].split("\n## ", 1)[0]


def readme_commands():
    """Every shell command in README's code blocks, in order: `sh` blocks line by line (trailing
    comments dropped) and the command part of `cron` lines."""
    commands = []
    for language, body in readme_blocks():
        for line in body.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if language == "sh":
                commands.append(re.sub(r"\s+#.*$", "", line))
            elif language == "cron":
                commands.append(line.split(None, 5)[5])
    return commands


def readme_cron_line():
    lines = [c for c in readme_commands() if "--daemon" in c]
    assert len(lines) == 1, lines
    return lines[0]


def _free_of_markers(env):
    return {k: v for k, v in env.items() if k not in _SCRUBBED_ENV}


class ProcessTestCase(unittest.TestCase):
    """A temp dir and a fake backend; every process started here is killed at the end."""

    def setUp(self):
        self.tmp = os.path.realpath(tempfile.mkdtemp(prefix="llm-proxy-firstday-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.marker = uuid.uuid4().hex
        self.addCleanup(self._kill_leftovers)
        self.upstream = start_upstream(self)

    def _kill_leftovers(self):
        for pid in _pids_with_marker(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def get_tags(self, port, cafile):
        """GET /api/tags through the proxy, trusting only `cafile`, strictly."""
        context = ssl.create_default_context(cafile=cafile)
        context.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), 10),
                                        server_hostname="localhost")
        try:
            conn.request("GET", "/api/tags")
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()


# ==================================================================================================
# 1. One base URL per client family, from one table; the real SDKs follow it
# ==================================================================================================

class ClientTableTests(unittest.TestCase):

    def test_each_family_has_the_base_url_its_sdk_needs(self):
        self.assertEqual(FAMILIES["openai"].suffix, "/v1")
        self.assertEqual(FAMILIES["anthropic"].suffix, "")   # the SDK appends /v1/messages
        self.assertEqual(FAMILIES["ollama"].suffix, "")

    def test_readme_table_agrees_with_the_proxy(self):
        text = readme_text()
        for family in proxy.CLIENT_FAMILIES:
            self.assertIn("| %s | `%s%s` |" % (family.label, README_ORIGIN, family.suffix), text)
        # The old advice that sent the Anthropic SDKs to /v1/v1/messages is gone.
        self.assertNotIn("/v1` for OpenAI/Anthropic", text)

    def test_readme_snippets_are_the_proxys_snippets(self):
        blocks = readme_blocks(readme_section("Point your client at the proxy"))
        for language, fence in (("python", "python"), ("javascript", "js")):
            shown = [body for lang, body in blocks if lang == fence]
            expected = [proxy.client_snippet(f, language, README_ORIGIN)
                        for f in proxy.CLIENT_FAMILIES]
            self.assertEqual(shown, expected, "README's %s snippets differ from "
                             "proxy.CLIENT_FAMILIES" % language)

    def test_snippets_say_how_to_trust_the_ca(self):
        for family in proxy.CLIENT_FAMILIES:
            python = proxy.client_snippet(family, "python", "https://h:1")
            javascript = proxy.client_snippet(family, "javascript", "https://h:1")
            self.assertIn('cafile="%s"' % proxy.CA_DOWNLOAD_NAME, python)
            self.assertIn("NODE_EXTRA_CA_CERTS=%s" % proxy.CA_DOWNLOAD_NAME, javascript)
            self.assertIn('"https://h:1%s"' % family.suffix, python)
            self.assertIn('"https://h:1%s"' % family.suffix, javascript)
        self.assertIn("SSL_CERT_FILE", readme_text())


def _strict_context():
    context = ssl.create_default_context(cafile=ca_file())
    context.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
    return context


class SnippetsWithRealClientsTests(unittest.TestCase):
    """Each snippet, exactly as the set-up page and README show it, run against the proxy."""

    def setUp(self):
        self.llm = FakeLLM()
        self.upstream = start_upstream(self, self.strict_backend)
        self.proxy = start_proxy(self, self.upstream.port)
        self.origin = "https://localhost:%d" % self.proxy.server_address[1]

    def strict_backend(self, handler, request):
        # Like Ollama: exact paths only (FakeLLM alone would answer /v1/v1/messages too).
        if request.path.split("?")[0] in ("/v1/chat/completions", "/v1/models", "/v1/messages",
                                          "/api/tags", "/api/chat"):
            self.llm(handler, request)
        else:
            handler.send_json(404, {"error": "404 page not found"})

    def client_from_snippet(self, key):
        namespace = {}
        exec(proxy.client_snippet(FAMILIES[key], "python", self.origin, ca_file()), namespace)
        return namespace["client"]

    def paths_seen(self):
        return [request.path for request in self.upstream.requests]

    @unittest.skipIf(openai is None, "the openai SDK is not installed (pip install openai)")
    def test_openai_snippet(self):
        client = self.client_from_snippet("openai")
        client.max_retries = 0
        completion = client.chat.completions.create(
            model="qwen3:8b", messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(completion.choices[0].message.content, "Hello from the fake model.")
        self.assertEqual([m.id for m in client.models.list().data], ["test-model"])
        self.assertEqual(self.paths_seen(), ["/v1/chat/completions", "/v1/models"])

    @unittest.skipIf(anthropic is None, "the anthropic SDK is not installed (pip install anthropic)")
    def test_anthropic_snippet(self):
        client = self.client_from_snippet("anthropic")
        message = client.with_options(max_retries=0).messages.create(
            model="claude-haiku-4-5-20251001", max_tokens=20,
            messages=[{"role": "user", "content": "hi"}])
        self.assertEqual(message.content[0].text, "Hello from the fake model.")
        self.assertEqual(self.paths_seen(), ["/v1/messages"])

    @unittest.skipIf(anthropic is None, "the anthropic SDK is not installed (pip install anthropic)")
    def test_the_url_the_old_docs_gave_anthropic_sdks_fails(self):
        # The negative that shows the test above can tell: `…/v1` doubles the prefix.
        client = anthropic.Anthropic(base_url=self.origin + "/v1", api_key="x", max_retries=0,
                                     http_client=anthropic.DefaultHttpxClient(
                                         verify=_strict_context()))
        with self.assertRaises(anthropic.NotFoundError):
            client.messages.create(model="m", max_tokens=5,
                                   messages=[{"role": "user", "content": "x"}])
        self.assertEqual(self.paths_seen(), ["/v1/v1/messages"])

    @unittest.skipIf(openai is None or anthropic is None, "the openai/anthropic SDKs are missing")
    def test_ssl_cert_file_is_enough_for_both_python_sdks(self):
        program = "\n".join([
            "import sys, openai, anthropic",
            "o = openai.OpenAI(base_url=sys.argv[1], api_key='x', max_retries=0)",
            "print([m.id for m in o.models.list().data])",
            "a = anthropic.Anthropic(base_url=sys.argv[2], api_key='x', max_retries=0)",
            "print(a.messages.create(model='m', max_tokens=5,",
            "      messages=[{'role': 'user', 'content': 'x'}]).content[0].text)",
        ])
        args = [sys.executable, "-c", program, self.origin + FAMILIES["openai"].suffix,
                self.origin + FAMILIES["anthropic"].suffix]
        env = _free_of_markers(os.environ)
        refused = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        self.assertNotEqual(refused.returncode, 0, "an SDK trusted the proxy without the CA")
        env["SSL_CERT_FILE"] = ca_file()
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        self.assertEqual(done.stdout.splitlines(), ["['test-model']", "Hello from the fake model."])

    def test_ollama_base_url(self):
        # No Ollama SDK here: do what it does with its host, append /api/tags.
        url = self.origin + FAMILIES["ollama"].suffix + "/api/tags"
        with urllib.request.urlopen(url, context=_strict_context(), timeout=10) as response:
            self.assertEqual(response.status, 200)
        self.assertEqual(self.paths_seen(), ["/api/tags"])

    @unittest.skipIf(shutil.which("node") is None, "node is not installed")
    def test_node_extra_ca_certs_lets_node_trust_the_proxy(self):
        script = ("fetch(process.argv[1]).then(r => r.json()).then(j => console.log(j.data[0].id))"
                  ".catch(e => { console.error(String(e.cause || e)); process.exit(3); })")
        url = self.origin + FAMILIES["openai"].suffix + "/models"
        env = _free_of_markers(os.environ)
        refused = subprocess.run(["node", "-e", script, url], env=env, capture_output=True,
                                 text=True, timeout=60)
        self.assertEqual(refused.returncode, 3, refused.stdout + refused.stderr)
        env["NODE_EXTRA_CA_CERTS"] = ca_file()
        done = subprocess.run(["node", "-e", script, url], env=env, capture_output=True,
                              text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), "test-model")
        self.assertEqual(self.paths_seen(), ["/v1/models"])

    def test_javascript_snippets_with_the_real_sdks(self):
        # The npm packages are not part of the test machine's standard kit: point
        # LLM_PROXY_NODE_MODULES at a node_modules with `openai` and `@anthropic-ai/sdk`.
        modules = os.environ.get("LLM_PROXY_NODE_MODULES", "")
        if shutil.which("node") is None or not os.path.isdir(os.path.join(modules, "openai")) \
                or not os.path.isdir(os.path.join(modules, "@anthropic-ai", "sdk")):
            self.skipTest("set LLM_PROXY_NODE_MODULES to a node_modules holding openai and "
                          "@anthropic-ai/sdk to run the JavaScript snippets")
        work = tempfile.mkdtemp(prefix="llm-proxy-node-")
        self.addCleanup(shutil.rmtree, work, True)
        os.symlink(os.path.abspath(modules), os.path.join(work, "node_modules"))
        calls = {
            "openai": "const r = await client.chat.completions.create({ model: 'm', "
                      "messages: [{ role: 'user', content: 'hi' }] });\n"
                      "console.log(r.choices[0].message.content);\n",
            "anthropic": "const r = await client.messages.create({ model: 'm', max_tokens: 9, "
                         "messages: [{ role: 'user', content: 'hi' }] });\n"
                         "console.log(r.content[0].text);\n",
        }
        env = dict(_free_of_markers(os.environ), NODE_EXTRA_CA_CERTS=ca_file())
        for key, call in calls.items():
            with self.subTest(family=key):
                path = os.path.join(work, key + ".mjs")
                with open(path, "w") as handle:
                    handle.write(proxy.client_snippet(FAMILIES[key], "javascript", self.origin,
                                                      ca_file()) + call)
                done = subprocess.run(["node", path], cwd=work, env=env, capture_output=True,
                                      text=True, timeout=60)
                self.assertEqual(done.returncode, 0, done.stderr[-2000:])
                self.assertEqual(done.stdout.strip(), "Hello from the fake model.")
        self.assertEqual(self.paths_seen(), ["/v1/chat/completions", "/v1/messages"])

    def test_setup_page_carries_the_table(self):
        conn = https(self.proxy)
        conn.request("GET", "/_proxy/")
        response = conn.getresponse()
        page = response.read().decode()
        conn.close()
        self.assertEqual(response.status, 200)
        for family in proxy.CLIENT_FAMILIES:
            self.assertIn('id="ep-%s" data-template="{origin}%s"' % (family.key, family.suffix),
                          page)
            self.assertIn(family.label, page)
        self.assertNotIn("OpenAI / Anthropic-compatible endpoint", page)

    def test_setup_page_in_chromium_shows_this_proxys_urls_and_snippets(self):
        import browser
        if browser.find_chromium() is None or shutil.which("certutil") is None:
            self.skipTest("Chromium or certutil is not installed")
        home = tempfile.mkdtemp(prefix="llm-proxy-browser-")
        self.addCleanup(shutil.rmtree, home, True)
        with browser.Browser(browser.make_trust_home(ca_file(), home)) as chromium:
            result, tab = browser.load_page(chromium, self.origin + "/_proxy/",
                                            browser.SETUP_READY, keep_tab=True)
            try:
                shown = tab.evaluate(
                    "JSON.stringify(Array.from(document.querySelectorAll('[data-template]'))"
                    ".map(function (e) { return [e.id, e.textContent]; }))")
            finally:
                tab.close()
        self.assertEqual(result.problems(), [])
        shown = dict(json.loads(shown))
        for family in proxy.CLIENT_FAMILIES:
            self.assertEqual(shown["ep-" + family.key], self.origin + family.suffix)
            for language in ("python", "javascript"):
                self.assertEqual(shown["%s-%s" % (language, family.key)],
                                 proxy.client_snippet(family, language, self.origin))


# ==================================================================================================
# 10. The banner: plain, short, LAN address, CA URL, set-up page
# ==================================================================================================

def _status(ca_created=False, ips=("127.0.0.1", "::1")):
    return proxy.CertStatus("created" if ca_created else "kept", "/srv/certs/cert.pem",
                            "/srv/certs/key.pem", "/srv/certs/combined.pem",
                            "/srv/certs/ca.pem", ca_created, ("localhost",), tuple(ips),
                            None, None, (), ())


class BannerTests(unittest.TestCase):

    def banner(self, config, status, discovered=("localhost", "127.0.0.1", "::1")):
        original = proxy.discover_hosts
        proxy.discover_hosts = lambda: list(discovered)
        try:
            return proxy.banner_text(config, status, 8443)
        finally:
            proxy.discover_hosts = original

    def test_urls_per_family_on_the_lan_address(self):
        config = proxy.config_from({"proxy.bind": "", "target.port": 11434})
        text = self.banner(config, _status(ca_created=True), discovered=(
            "localhost", "pi", "127.0.0.1", "::1", "fd00::20", "192.168.1.20", "10.0.0.5"))
        origin = "https://192.168.1.20:8443"
        for family in proxy.CLIENT_FAMILIES:
            self.assertRegex(text, r"(?m)^  %s +%s$" % (re.escape(family.label),
                                                        re.escape(origin + family.suffix)))
        self.assertIn("open %s/_proxy/ on it" % origin, text)
        self.assertIn("CA certificate: %s/_proxy/ca.pem  (NEW" % origin, text)
        self.assertIn("on this machine: /srv/certs/ca.pem", text)
        self.assertNotIn("localhost", text)

    def test_readme_shows_the_real_banner(self):
        shown = [body for lang, body in readme_blocks() if lang == "text"
                 and body.startswith("llm-proxy ")]
        self.assertEqual(len(shown), 1)
        status = _status(ca_created=True)._replace(ca_file="/home/pi/llm-proxy/certs/ca.pem")
        text = self.banner(proxy.config_from({}), status, discovered=("localhost", "192.168.1.20"))
        self.assertEqual(shown[0], text + "\n")

    def test_plain_and_short(self):
        text = self.banner(proxy.config_from({}), _status(), discovered=("localhost", "192.168.1.20"))
        lines = text.splitlines()
        self.assertLessEqual(len(lines), 12, text)
        self.assertTrue(all(len(line) <= 100 for line in lines), text)
        self.assertFalse([line for line in lines if re.match(r"\d{4}-\d\d-\d\d|INFO", line)])
        self.assertNotIn("\\", text)                    # no multi-line shell commands
        self.assertNotIn("NEW", text)                   # the CA existed already

    def test_tls_hosts_name_the_address_in_docker(self):
        config = proxy.config_from({"tls.hosts": ["192.168.1.20", "nas.lan"]})
        text = self.banner(config, _status(), discovered=("localhost", "172.17.0.2"))
        self.assertIn("https://192.168.1.20:8443/_proxy/", text)
        self.assertNotIn("172.17.0.2", text)

    def test_a_wildcard_or_bracketed_tls_host_still_gives_a_usable_url(self):
        text = self.banner(proxy.config_from({"tls.hosts": ["*.home.lan", "[fd00::20]"]}), _status())
        self.assertIn("https://[fd00::20]:8443/_proxy/", text)
        self.assertNotIn("*", text)

    def test_bound_address_wins(self):
        text = self.banner(proxy.config_from({"proxy.bind": "10.0.0.5", "tls.hosts": ["x.lan"]}), _status(),
                           discovered=("192.168.1.20",))
        self.assertIn("https://10.0.0.5:8443/v1", text)

    def test_no_lan_address_falls_back_to_localhost(self):
        text = self.banner(proxy.config_from({}), _status(), discovered=("localhost", "127.0.0.1"))
        self.assertIn("https://localhost:8443/v1", text)

    def test_progress_is_shown_only_while_a_ca_is_made(self):
        work = tempfile.mkdtemp(prefix="llm-proxy-progress-")
        self.addCleanup(shutil.rmtree, work, True)
        shutil.copy(os.path.join(certs_dir(), "ca.pem"), work)
        shutil.copy(os.path.join(certs_dir(), "ca-key.pem"), work)
        said = []
        proxy.ensure_certificates(os.path.join(work, "cert.pem"), os.path.join(work, "key.pem"),
                                  progress=said.append)
        self.assertEqual(said, [], "progress shown though the CA existed")
        fresh = os.path.join(work, "fresh")
        status = proxy.ensure_certificates(os.path.join(fresh, "cert.pem"),
                                           os.path.join(fresh, "key.pem"), progress=said.append)
        self.assertTrue(status.ca_created)
        self.assertEqual(said, ["creating a local certificate authority (one time, ~2 s)..."])


# ==================================================================================================
# 11. --help: environment variables, endpoints, examples
# ==================================================================================================

class HelpTests(unittest.TestCase):

    def help_text(self):
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit):
            proxy.build_parser().parse_args(["--help"])
        return out.getvalue()

    def test_help_lists_environment_variables_endpoints_and_examples(self):
        text = self.help_text()
        for name, dotted in proxy.ENV_OVERRIDES:
            self.assertRegex(text, r"(?m)^  %s +%s" % (name, re.escape(dotted)))
        self.assertRegex(text, r"(?m)^  %s +adds one access key" % proxy.ACCESS_KEY_ENV)
        endpoints = text.split("endpoints of the proxy itself", 1)[1].split("\n\n", 1)[0]
        for path in proxy.ProxyHandler.INTERNAL_ROUTES:
            self.assertIn(path + ("/" if path == "/_proxy" else ""), endpoints)
        for family in proxy.CLIENT_FAMILIES:
            self.assertIn("https://<this-machine>:8443%s\n" % family.suffix, text)
        examples = re.findall(r"(?m)^  (?:\w+=\S+ )*(?:python3 \S*proxy\.py.*)$",
                              text.split("examples:")[1])
        self.assertGreaterEqual(len(examples), 2, text)
        for example in examples:      # every example is a command line proxy.py accepts
            argv = example.split("proxy.py", 1)[1].split()
            proxy.build_parser().parse_args(argv)

    def test_help_is_what_the_program_prints(self):
        done = subprocess.run([sys.executable, PROXY_PY, "--help"], capture_output=True,
                              text=True, timeout=30, env=dict(os.environ, COLUMNS="100"))
        self.assertEqual(done.returncode, 0)
        self.assertIn("TLS_HOSTS", done.stdout)
        self.assertIn("examples:", done.stdout)


# ==================================================================================================
# 12. TLS_HOSTS
# ==================================================================================================

class TlsHostsTests(unittest.TestCase):

    def test_env_var_is_a_comma_list(self):
        config = proxy.load_config(environ={"TLS_HOSTS": " 192.168.1.20, nas.lan ,"},
                                   search_cwd=False)
        self.assertEqual(config.tls_hosts, ("192.168.1.20", "nas.lan"))

    def test_a_bad_entry_stops_the_start_naming_the_variable(self):
        with self.assertRaises(proxy.ConfigError) as caught:
            proxy.load_config(environ={"TLS_HOSTS": "nas.lan,not a host"}, search_cwd=False)
        self.assertIn("TLS_HOSTS", str(caught.exception))
        self.assertIn("not a host", str(caught.exception))

    def test_the_certificate_names_them_and_a_strict_client_accepts_them(self):
        work = tempfile.mkdtemp(prefix="llm-proxy-tlshosts-")
        self.addCleanup(shutil.rmtree, work, True)
        certs = os.path.join(work, "certs")
        shutil.copytree(certs_dir(), certs)
        # Names the CA may sign for (local names, private addresses: see test_trust.py).
        config = proxy.load_config(environ={"TLS_HOSTS": "proxy.lan,192.168.77.44"},
                                   search_cwd=False)
        status = proxy.ensure_certificates(os.path.join(certs, "cert.pem"),
                                           os.path.join(certs, "key.pem"),
                                           extra_hosts=config.tls_hosts)
        self.assertEqual(status.action, "renewed")
        self.assertIn("proxy.lan", status.dns_names)
        self.assertIn("192.168.77.44", status.ip_addresses)
        upstream = start_upstream(self)
        server = start_proxy(self, upstream.port, cert_file=os.path.join(certs, "cert.pem"),
                             key_file=os.path.join(certs, "key.pem"))
        context = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
        for name, ok in (("proxy.lan", True), ("other.lan", False)):
            with socket.create_connection(("127.0.0.1", server.server_address[1]), 10) as raw:
                if ok:
                    context.wrap_socket(raw, server_hostname=name).close()
                else:
                    with self.assertRaises(ssl.SSLCertVerificationError):
                        context.wrap_socket(raw, server_hostname=name)

    def test_compose_file_and_readme_show_it(self):
        with open(os.path.join(ROOT, "docker-compose.yml")) as handle:
            self.assertIn("TLS_HOSTS=", handle.read())
        docker = readme_text().split("### Docker", 1)[1].split("\n## ", 1)[0]
        self.assertIn("TLS_HOSTS=", docker)


# ==================================================================================================
# 2 and 9. The cron recipe, literally: proxy.py alone in a folder, run from / with a bare PATH
# ==================================================================================================

@unittest.skipUnless(os.path.isdir("/proc/self") and os.path.exists("/usr/bin/python3"),
                     "needs Linux /proc and /usr/bin/python3 (cron's bare PATH finds that one)")
class CronRecipeTests(ProcessTestCase):

    def setUp(self):
        super().setUp()
        self.install = os.path.join(self.tmp, "llm-proxy")     # stands for /opt/llm-proxy
        os.makedirs(self.install)
        shutil.copy(PROXY_PY, self.install)
        self.logfile = os.path.join(self.install, "llm-proxy.log")

    def cron_env(self, **extra):
        env = {"PATH": "/usr/bin:/bin", _MARKER_VAR: self.marker,
               "PROXY_PORT": "0", "TARGET_PORT": str(self.upstream.port)}
        env.update(extra)
        return env

    def run_line(self, line, cwd="/", env=None):
        """Run a README command line as cron does: /bin/sh -c, from `cwd`, bare environment."""
        command = line.replace("/opt/llm-proxy", self.install)
        return subprocess.run(["/bin/sh", "-c", command], cwd=cwd, env=env or self.cron_env(),
                              capture_output=True, text=True, timeout=START_TIMEOUT)

    def logged_port(self):
        self.assertTrue(wait_until(lambda: _LISTENING.search(_read(self.logfile)), timeout=20),
                        _read(self.logfile))
        return int(_LISTENING.findall(_read(self.logfile))[-1][1])

    def test_the_readme_cron_line_starts_once_then_is_a_no_op_and_stops(self):
        line = readme_cron_line()
        self.assertIn("/opt/llm-proxy/proxy.py", line)
        ours = {"certs", "stats.json", "llm-proxy.pid", "llm-proxy.log"}
        before_root = ours & set(os.listdir("/"))
        first = self.run_line(line)
        self.assertEqual(first.returncode, 0, first.stdout + first.stderr)
        self.assertIn(proxy.CA_PROGRESS_MESSAGE, first.stderr)
        self.assertNotIn("error", first.stderr)
        port = self.logged_port()
        ca = os.path.join(self.install, "certs", "ca.pem")
        status, body = self.get_tags(port, ca)
        self.assertEqual((status, body["path"]), (200, "/api/tags"))
        pids = _pids_with_marker(self.marker)
        self.assertEqual(len(pids), 1)
        with open(ca, "rb") as handle:
            ca_bytes = handle.read()

        second = self.run_line(line)
        self.assertEqual(second.returncode, 0, second.stdout + second.stderr)
        self.assertEqual(second.stderr, "")
        self.assertEqual(_pids_with_marker(self.marker), pids)
        with open(ca, "rb") as handle:
            self.assertEqual(handle.read(), ca_bytes)
        self.assertEqual(ours & set(os.listdir("/")), before_root, "files landed in /")
        for name in ("certs", "llm-proxy.pid", "llm-proxy.log"):     # stats.json: at exit
            self.assertIn(name, os.listdir(self.install))

        # --stop from anywhere, without --dir: found beside proxy.py.
        elsewhere = os.path.join(self.tmp, "elsewhere")
        os.makedirs(elsewhere)
        stop = self.run_line("python3 /opt/llm-proxy/proxy.py --stop", cwd=elsewhere)
        self.assertEqual(stop.returncode, 0, stop.stdout + stop.stderr)
        self.assertIn("stopped (pid %d)" % pids[0], stop.stdout)
        self.assertTrue(wait_until(lambda: not _alive(pids[0]), timeout=5))
        self.assertTrue(os.path.exists(os.path.join(self.install, "stats.json")))
        self.assertEqual(os.listdir(elsewhere), [])

        # Again, and this time the README's own --stop line; the start prints the banner.
        again = self.run_line(line.replace(">/dev/null", ""))
        self.assertEqual(again.returncode, 0, again.stdout + again.stderr)
        self.assertIn("started (pid", again.stdout)
        self.assertIn("on this machine: %s" % ca, again.stdout)
        self.assertRegex(again.stdout, r"open https://\S+:\d+/_proxy/ on it")
        stop_line = [c for c in readme_commands() if c.endswith("--stop")]
        self.assertEqual(len(stop_line), 1)
        stop = self.run_line(stop_line[0])
        self.assertEqual(stop.returncode, 0, stop.stdout + stop.stderr)
        # --stop returns when the daemon let go of the pidfile; its interpreter exits just after.
        self.assertTrue(wait_until(lambda: _pids_with_marker(self.marker) == [], timeout=5))

        # Nothing running: --stop without --dir says where it looked, and fails.
        stop = self.run_line("python3 /opt/llm-proxy/proxy.py --stop", cwd=elsewhere)
        self.assertEqual(stop.returncode, 1, stop.stdout + stop.stderr)
        self.assertIn(os.path.join(self.install, "llm-proxy.pid"), stop.stderr)
        self.assertIn(os.path.join(elsewhere, "llm-proxy.pid"), stop.stderr)

    def write_config(self, settings):
        with open(os.path.join(self.install, "config.json"), "w") as handle:
            handle.write(settings if isinstance(settings, str) else json.dumps(settings))

    def assert_failed_start(self, result, code, message):
        self.assertEqual(result.returncode, code, result.stdout + result.stderr)
        self.assertIn("error: " + message, result.stderr)
        logged = _read(self.logfile)
        self.assertRegex(logged, r"\d\d:\d\d:\d\d,\d{3} ERROR " + re.escape(message))
        self.assertNotIn("Traceback", result.stderr + logged)
        self.assertFalse(os.path.exists(os.path.join(self.install, "certs")),
                         "a CA was made for a start that failed")
        self.assertEqual(_pids_with_marker(self.marker), [])

    def test_a_bad_config_is_logged_and_makes_no_ca(self):
        self.write_config('{"proxy": {"port": 8443,}}')
        result = self.run_line(readme_cron_line())
        self.assert_failed_start(result, 2, "%s: invalid JSON at line 1"
                                 % os.path.join(self.install, "config.json"))

    def test_a_port_in_use_is_logged_and_makes_no_ca(self):
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        self.write_config({"proxy": {"port": port, "bind": "127.0.0.1"}})
        result = self.run_line(readme_cron_line(), env=self.cron_env(PROXY_PORT=""))
        self.assert_failed_start(result, 1, "port %d is already in use" % port)

    def test_a_relative_dir_means_the_same_folder_for_start_and_stop(self):
        work = os.path.join(self.tmp, "work")
        os.makedirs(os.path.join(work, "state"))
        shutil.copy(PROXY_PY, work)
        env = self.cron_env()
        start = subprocess.run(["python3", "proxy.py", "--dir", "state", "--daemon"], cwd=work,
                               env=env, capture_output=True, text=True, timeout=START_TIMEOUT)
        self.assertEqual(start.returncode, 0, start.stdout + start.stderr)
        state = os.path.join(work, "state")
        self.assertIn("logging to %s" % os.path.join(state, "llm-proxy.log"), start.stdout)
        self.assertTrue(os.path.exists(os.path.join(state, "certs", "ca.pem")))
        self.assertIn("no config file given and no %s" % os.path.join(state, "config.json"),
                      _read(os.path.join(state, "llm-proxy.log")))
        stop = subprocess.run(["python3", "proxy.py", "--dir", "state", "--stop"], cwd=work,
                              env=env, capture_output=True, text=True, timeout=START_TIMEOUT)
        self.assertEqual(stop.returncode, 0, stop.stdout + stop.stderr)
        self.assertIn("stopped", stop.stdout)
        # Beside proxy.py only its bytecode cache, which a start writes when it can (issue 16).
        self.assertEqual(sorted(set(os.listdir(work)) - {"__pycache__"}), ["proxy.py", "state"])

    def test_a_missing_dir_is_a_clear_error(self):
        result = self.run_line("python3 /opt/llm-proxy/proxy.py --dir /opt/llm-proxy/nope --daemon")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("no such folder", result.stderr)


# ==================================================================================================
# 3. generate_cert.py does what the README says, also after the first start
# ==================================================================================================

class GenerateCertAfterFirstStartTests(ProcessTestCase):

    def run_cli(self, *args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "generate_cert.py")] +
                              list(args), cwd=self.tmp, capture_output=True, text=True,
                              timeout=START_TIMEOUT)

    def test_a_certificate_we_did_not_issue_is_left_alone(self):
        out = os.path.join(self.tmp, "certs")
        os.makedirs(out)
        for name in ("cert.pem", "key.pem"):          # a server certificate without its CA
            shutil.copy(os.path.join(certs_dir(), name), out)
        before = {name: _read(os.path.join(out, name)) for name in os.listdir(out)}
        for args in ((), ("--host", "proxy.lan")):
            with self.subTest(args=args):
                result = self.run_cli("--out", out, *args)
                self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
                self.assertIn("was not issued by the CA in", result.stderr)
                self.assertIn("--force", result.stderr)
                self.assertEqual({n: _read(os.path.join(out, n)) for n in os.listdir(out)},
                                 before)

    def test_host_after_the_first_start_adds_the_name_with_the_same_ca(self):
        out = os.path.join(self.tmp, "certs")
        shutil.copytree(certs_dir(), out)             # as the proxy's first start left them
        ca_before = _read(os.path.join(out, "ca.pem"))
        result = self.run_cli("--out", out, "--host", "proxy.lan")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("server certificate (renewed)", result.stdout)
        self.assertIn("proxy.lan", proxy.read_certificate_info(
            os.path.join(out, "cert.pem")).dns_names)
        self.assertEqual(_read(os.path.join(out, "ca.pem")), ca_before)
        again = self.run_cli("--out", out, "--host", "proxy.lan")
        self.assertIn("server certificate (kept)", again.stdout)


# ==================================================================================================
# 3. Every shell command in README's code blocks
# ==================================================================================================

# Commands that are not run here, with the reason. Anything else in a README code block runs.
SKIPPED = {
    "python3 tests/run.py": "the suite itself: this test is part of it",
    "python3 tests/bench.py --quick": "a 20-second benchmark against nginx; run by hand",
    "docker compose up -d": "needs Docker and a network; DockerTests (test_service.py) build "
                            "and run the image where docker exists",
}
# Run by CronRecipeTests above, as cron runs them (from /, bare PATH, proxy.py alone).
RUN_BY_CRON_TESTS = "run literally by CronRecipeTests"


class ReadmeCommandsTests(ProcessTestCase):
    """Walk README top to bottom in a fresh folder, as a new user: every command must work."""

    def test_every_readme_command_runs(self):
        commands = readme_commands()
        self.assertIn("python3 proxy.py", commands)
        work = os.path.join(self.tmp, "checkout")
        os.makedirs(work)
        for name in ("proxy.py", "generate_cert.py", "config.example.json"):
            shutil.copy(os.path.join(ROOT, name), work)
        env = dict(_free_of_markers(os.environ), PYTHONDONTWRITEBYTECODE="1",
                   **{_MARKER_VAR: self.marker})
        port = None
        ran = []
        for command in commands:
            if command in SKIPPED:
                continue
            if "/opt/llm-proxy" in command:
                self.assertIn(command, [readme_cron_line()] + [
                    c for c in commands if c.endswith("--stop")], RUN_BY_CRON_TESTS)
                continue
            with self.subTest(command=command):
                if command == "python3 proxy.py":
                    port = self.start_in_background(work, env)
                    continue
                self.assertIsNotNone(port, "%r comes before the proxy is started" % command)
                # 192.168.1.20 is README's example address of the proxy: here, loopback.
                local = command.replace(":8443", ":%d" % port).replace("192.168.1.20",
                                                                          "localhost")
                for host in re.findall(r"https?://([^/:\s]+)", local):
                    self.assertIn(host, ("localhost", "127.0.0.1"), "not loopback: " + local)
                done = subprocess.run(["/bin/sh", "-c", local], cwd=work, env=env,
                                      capture_output=True, text=True, timeout=START_TIMEOUT)
                self.assertEqual(done.returncode, 0, "%s\n%s%s" % (local, done.stdout,
                                                                    done.stderr))
                self.assertNotIn("Traceback", done.stderr)
                self.check_effect(command, done.stdout, work)
                ran.append(command)
        self.assertGreaterEqual(len(ran), 4, ran)

    def start_in_background(self, work, env):
        err_path = os.path.join(self.tmp, "proxy.stderr")
        with open(err_path, "w") as err, open(os.devnull, "w") as out:
            child = subprocess.Popen(
                [sys.executable, "proxy.py"], cwd=work, stdout=out, stderr=err,
                stdin=subprocess.DEVNULL,
                env=dict(env, PROXY_PORT="0", TARGET_PORT=str(self.upstream.port)))

        def stop():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
        self.addCleanup(stop)
        self.assertTrue(wait_until(lambda: _LISTENING.search(_read(err_path)) or child.poll(),
                                   timeout=START_TIMEOUT), _read(err_path))
        self.assertIsNone(child.poll(), _read(err_path))
        return int(_LISTENING.search(_read(err_path)).group(2))

    def check_effect(self, command, stdout, work):
        """What a command must have done, beyond exiting 0."""
        if command.startswith("curl") and command.endswith("/api/tags"):
            self.assertEqual(json.loads(stdout)["path"], "/api/tags")
        elif command.startswith("python3 generate_cert.py --host "):
            name = command.split("--host ", 1)[1].split()[0]
            info = proxy.read_certificate_info(os.path.join(work, "certs", "cert.pem"))
            self.assertIn(name, info.dns_names)
            self.assertIn("unchanged", stdout)          # same CA: nothing to re-trust
        elif command == "python3 generate_cert.py":
            self.assertIn("Certificate Trust Settings", stdout)
        elif command.endswith("/_proxy/stats"):
            self.assertIn("requests", json.loads(stdout))

    def test_every_skip_is_still_in_the_readme(self):
        commands = readme_commands()
        for command in SKIPPED:
            self.assertIn(command, commands, "stale entry in SKIPPED")

    def test_the_example_error_is_the_real_one(self):
        # README quotes the message for "port": "84433"; it must be what proxy.py says.
        match = re.search(r"`error: (/\S+): (proxy\.port must be [^`]+)`", readme_text())
        self.assertTrue(match)
        work = os.path.join(self.tmp, "etc")
        os.makedirs(work)
        path = os.path.join(work, "config.json")
        with open(path, "w") as handle:
            json.dump({"proxy": {"port": "84433"}}, handle)
        with self.assertRaises(proxy.ConfigError) as caught:
            proxy.load_config(path, environ={})
        self.assertEqual(str(caught.exception), "%s: %s" % (path, match.group(2)))

    def test_quick_start_says_the_proxy_keeps_running(self):
        quick = readme_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
        self.assertIn("keeps running", quick)
        self.assertIn("second terminal", quick)
        self.assertNotIn("about 1 s", readme_text())
        self.assertIn("combined.pem", readme_text())


if __name__ == "__main__":
    unittest.main()
