"""Shared pieces stated once (issue 13, item 7): the trust steps, the pages' prelude, the address
and base URLs --add-key prints.

Each test compares one rendering with the table it comes from, so a second copy that drifts
(README, the set-up page, the terminal) fails here instead of confusing a user.
"""

import contextlib
import io
import json
import os
import re
import shutil
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
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = proxy.main(["--config", path, "--add-key", "laptop"])
        self.assertEqual(status, 0, out.getvalue())
        return out.getvalue(), proxy.load_config(path, environ={})

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


if __name__ == "__main__":
    unittest.main()
