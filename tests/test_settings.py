"""Settings as data (issue 13, item 2): one row of proxy.SETTINGS per config key.

Defaults, checks, environment overrides, the Config attributes, --help and README's two
configuration tables all come from the table; these tests hold each of them to it.
"""

import dataclasses
import io
import json
import os
import tempfile
import unittest
from contextlib import redirect_stdout

from support import ROOT, make_config, proxy


def readme_table_rows(header: str):
    """The rows of README's table that starts with `header` (without header and rule)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    start = text.index(header + "\n")
    lines = text[start:].split("\n\n", 1)[0].splitlines()
    return lines[2:]


class SettingsTableTests(unittest.TestCase):

    maxDiff = None

    def test_readme_tables_are_the_settings_table(self):
        keys, env = proxy.settings_markdown()
        # On a failure, the expected rows are the ones to paste into README.md.
        self.assertEqual(readme_table_rows("| Key | Default | Meaning |"), keys,
                         "README's config table differs from proxy.SETTINGS:\n" + "\n".join(keys))
        self.assertEqual(readme_table_rows("| Environment variable | Overrides |"), env,
                         "README's environment table differs:\n" + "\n".join(env))

    def test_every_default_passes_its_own_check_and_keys_are_unique(self):
        self.assertEqual(len({s.key for s in proxy.SETTINGS}), len(proxy.SETTINGS))
        self.assertEqual(len({s.attr for s in proxy.SETTINGS}), len(proxy.SETTINGS))
        envs = [s.env for s in proxy.SETTINGS if s.env]
        self.assertEqual(len(set(envs + [proxy.ACCESS_KEY_ENV])), len(envs) + 1)
        for setting in proxy.SETTINGS:
            self.assertIsNone(setting.check(setting.default), setting.key)
            self.assertEqual(proxy.CONFIG_DEFAULTS[setting.key.split(".")[0]]
                             [setting.key.split(".", 1)[1]], setting.default)
        self.assertEqual(set(proxy.SECRET_SETTINGS),
                         {"proxy.adminToken", "target.apiKey", "access.keys"})

    def test_config_holds_no_second_copy_of_the_defaults(self):
        for f in dataclasses.fields(proxy.Config):
            self.assertIs(f.default, dataclasses.MISSING, f.name)
            self.assertIs(f.default_factory, dataclasses.MISSING, f.name)
        with self.assertRaises(TypeError):
            proxy.Config()          # only load_config()/config_from() make one
        self.assertEqual([f.name for f in dataclasses.fields(proxy.Config)][:len(proxy.SETTINGS)],
                         [s.attr for s in proxy.SETTINGS])

    def test_config_from_builds_what_load_config_builds(self):
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "config.json")
            with open(path, "w") as handle:
                json.dump({"proxy": {"port": 9443, "allowedOrigins": "https://a.example",
                                     "websocketIdleTimeout": 5},
                           "tls": {"hosts": ["nas.lan"]}}, handle)
            from_file = proxy.load_config(path, environ={})
            old = os.getcwd()
            os.chdir(directory)
            try:
                from_dict = proxy.config_from({"proxy.port": 9443,
                                               "proxy.allowedOrigins": "https://a.example",
                                               "proxy.websocketIdleTimeout": 5,
                                               "tls.hosts": ["nas.lan"]})
                defaults = proxy.config_from({})
                self.assertEqual(defaults, proxy.load_config(environ={}, search_cwd=False))
            finally:
                os.chdir(old)
        self.assertEqual(dataclasses.replace(from_file, source=None), from_dict)
        self.assertEqual(from_dict.websocket_idle_timeout, 5.0)
        self.assertEqual(from_dict.allowed_origins, ("https://a.example",))
        self.assertEqual(defaults.port, 8443)
        self.assertEqual(defaults.max_connections, 512)

    def test_config_from_refuses_an_unknown_key_and_a_bad_value_naming_the_key(self):
        with self.assertRaisesRegex(proxy.ConfigError, r"proxy\.prot.*did you mean 'proxy\.port'"):
            proxy.config_from({"proxy.prot": 1})
        with self.assertRaisesRegex(proxy.ConfigError,
                                    r"^settings: proxy\.maxConnections must be .*got 0$"):
            proxy.config_from({"proxy.maxConnections": 0})
        with self.assertRaises(proxy.ConfigError) as raised:
            proxy.config_from({"target.apiKey": "bad key\nX-Evil: 1"})
        self.assertIn("target.apiKey", str(raised.exception))
        self.assertNotIn("Evil", str(raised.exception))

    def test_environment_overrides_come_from_the_table(self):
        config = proxy.config_from({}, environ={"TLS_HOSTS": "a.lan, b.lan", "PROXY_PORT": "9000",
                                                "TARGET_API_KEY": "sk-backend-1"})
        self.assertEqual(config.tls_hosts, ("a.lan", "b.lan"))
        self.assertEqual(config.port, 9000)
        self.assertEqual(config.target_api_key, "sk-backend-1")
        with self.assertRaisesRegex(proxy.ConfigError, r"environment variable PROXY_PORT"):
            proxy.config_from({}, environ={"PROXY_PORT": "x"})

    def test_help_lists_every_environment_variable_of_the_table(self):
        out = io.StringIO()
        with redirect_stdout(out), self.assertRaises(SystemExit):
            proxy.build_parser().parse_args(["--help"])
        for setting in proxy.SETTINGS:
            if setting.env:
                self.assertRegex(out.getvalue(), r"(?m)^  %s +%s" % (setting.env, setting.key))

    def test_test_configs_are_checked_like_production_ones(self):
        with self.assertRaises(proxy.ConfigError):
            make_config(max_connections=0)
        self.assertNotIn("admin_token='t'", repr(make_config(admin_token="t")))


if __name__ == "__main__":
    unittest.main()
