"""Shared pieces stated once (issue 13, item 7): the trust steps, the pages' prelude, the address
and base URLs --add-key prints.

Each test compares one rendering with the table it comes from, so a second copy that drifts
(README, the set-up page, the terminal) fails here instead of confusing a user.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

from support import proxy


class AddKeyOutputTests(unittest.TestCase):
    """--add-key prints the banner's address and every CLIENT_FAMILIES base URL."""

    def run_add_key(self, document):
        folder = tempfile.mkdtemp(prefix="llm-proxy-pages-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "config.json")
        with open(path, "w") as handle:
            json.dump(document, handle)
        # A process of its own: main() sets up logging for the whole process.
        result = subprocess.run([sys.executable, proxy.__file__, "--config", path, "--add-key",
                                 "laptop"], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout, proxy.load_config(path, environ={})

    def test_the_host_is_the_banners_choice_and_urls_come_from_the_families(self):
        # tls.hosts names the address other devices use (in Docker, TLS_HOSTS names the host's
        # address). The banner opens with that name, and --add-key must print the same one.
        output, config = self.run_add_key({"proxy": {"port": 9443},
                                           "tls": {"hosts": ["proxy.lan"]}})
        origin = "https://proxy.lan:9443"
        status = proxy.CertStatus("kept", "c.pem", "k.pem", None, "ca.pem", False, (), (),
                                  None, None, (), ())
        self.assertIn("llm-proxy %s: %s -> " % (proxy.VERSION, origin),
                      proxy.banner_text(config, status, 9443))
        for family in proxy.CLIENT_FAMILIES:
            self.assertRegex(output, r"(?m)^  %s +%s$" % (re.escape(family.label),
                                                          re.escape(origin + family.suffix)))
        self.assertIn('OpenAI(base_url="%s/v1", api_key="sk-' % origin, output)
        self.assertIn('Anthropic(base_url="%s", api_key="sk-' % origin, output)
        self.assertIn(" %s/v1/models" % origin, output)

    def test_a_config_file_that_cannot_be_written_is_exit_status_1(self):
        folder = tempfile.mkdtemp(prefix="llm-proxy-pages-")
        self.addCleanup(shutil.rmtree, folder, True)
        blocker = os.path.join(folder, "not-a-folder")
        open(blocker, "w").close()
        result = subprocess.run([sys.executable, proxy.__file__, "--config",
                                 os.path.join(blocker, "config.json"), "--add-key", "laptop"],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("error: cannot write %s" % os.path.join(blocker, "config.json"),
                      result.stderr)
        self.assertNotIn("sk-", result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()


class TrustTableTests(unittest.TestCase):
    """TRUST_PLATFORMS is the one copy of the trust steps: README, set-up page and terminal."""

    def test_readme_shows_exactly_the_rendered_table(self):
        with open(os.path.join(os.path.dirname(proxy.__file__), "README.md"),
                  encoding="utf-8") as handle:
            readme = handle.read()
        section = readme.split("\n## Trust the certificate\n", 1)[1].split("\n## ", 1)[0]
        shown = [line for line in section.splitlines() if line.startswith("| ")]
        shown = shown[:shown.index("| File in `certs/` | What |")]
        expected = proxy.trust_table_markdown().splitlines()
        self.assertEqual([line for line in shown], [expected[0]] + expected[2:],
                         "README's trust table differs from proxy.trust_table_markdown()")
        self.assertIn(expected[1], section)

    def test_the_setup_page_has_one_section_per_platform_with_its_commands(self):
        page = proxy.SETUP_HTML
        ids = re.findall(r'<details class="os" id="os-([a-z]+)">', page)
        self.assertEqual(ids, [platform.key for platform in proxy.TRUST_PLATFORMS])
        for platform in proxy.TRUST_PLATFORMS:
            block = page.split('id="os-%s"' % platform.key, 1)[1].split("</details>", 1)[0]
            self.assertEqual(block.count("<li>"), len(platform.steps))
            for step in platform.steps:
                for command in step.commands:
                    expected = command.replace("{ca}", proxy.CA_DOWNLOAD_NAME)
                    self.assertIn(expected.replace("&", "&amp;").replace('"', "&quot;"), block)
        # The page's script opens the visitor's platform by these ids.
        for key in ("ios", "android", "macos", "windows", "linux", "firefox"):
            self.assertIn('byId("os-" + mine[i])', page)
            self.assertIn('out.push("%s")' % key, page)

    def test_the_terminal_text_has_every_step_and_command_with_the_real_paths(self):
        text = proxy.trust_instructions("/srv/certs/ca.pem", "https://192.0.2.1:8443/_proxy/ca.crt")
        flat = " ".join(text.split())
        for platform in proxy.TRUST_PLATFORMS:
            self.assertIn("\n%s:\n" % platform.name, text)
            for step in platform.steps:
                for command in step.commands:
                    self.assertIn("       " + command.replace("{ca}", "/srv/certs/ca.pem"), text)
        self.assertIn("download https://192.0.2.1:8443/_proxy/ca.crt", flat)
        self.assertNotIn("{", text.replace("${", ""))
        self.assertNotIn("*", text)
        self.assertNotIn("`", text)

    def test_markup_is_escaped_on_the_page(self):
        html = proxy.render_trust_text("<b>x</b> *y* `z` [A > B] {ca}", {"ca": "<code>c</code>"},
                                       escape=proxy._html_escape, bold="<b>{}</b>".format,
                                       code="<code>{}</code>".format,
                                       menu='<span class="path">{}</span>'.format)
        self.assertEqual(html, '&lt;b&gt;x&lt;/b&gt; <b>y</b> <code>z</code> '
                               '<span class="path">A &gt; B</span> <code>c</code>')


class PagePreludeTests(unittest.TestCase):
    """Both pages are built on the same prelude, inside their one hashed <style>/<script>."""

    def test_each_page_includes_the_prelude_once_inside_its_hashed_blocks(self):
        for html in (proxy.DASHBOARD_HTML, proxy.SETUP_HTML):
            self.assertTrue(html.startswith(proxy.PAGE_HEAD + "\n"))
            self.assertEqual(re.findall(r"<!--[A-Z_]+-->|/\*PAGE_[A-Z]+\*/", html), [])
            styles = re.findall(r"<style>(.*?)</style>", html, re.S)
            scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
            self.assertEqual((len(styles), len(scripts)), (1, 1))
            self.assertTrue(styles[0].startswith("\n" + proxy.PAGE_CSS))  # the page adds to it
            self.assertEqual(scripts[0].count(proxy.PAGE_JS), 1)
            csp = dict(proxy.page_headers(html))["Content-Security-Policy"]
            for block, directive in ((styles[0], "style-src"), (scripts[0], "script-src")):
                digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
                self.assertIn("%s 'sha256-%s'" % (directive, digest), csp)
