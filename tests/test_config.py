"""Configuration: the spec's keys, defaults and env overrides; errors that name file, key and value."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

from support import proxy, ROOT


class ConfigTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="llm-proxy-config-")

    def write(self, text, name="config.json"):
        path = os.path.join(self.dir, name)
        with open(path, "w") as handle:
            handle.write(text if isinstance(text, str) else json.dumps(text))
        return path

    def test_defaults_are_the_specs(self):
        config = proxy.load_config(None, environ={}, search_cwd=False)
        self.assertEqual(config.port, 8443)
        self.assertEqual(config.allowed_origins, ("*",))
        self.assertEqual((config.target_host, config.target_port), ("127.0.0.1", 11434))
        self.assertEqual(config.cert_file, os.path.join(os.getcwd(), "certs", "cert.pem"))
        self.assertEqual(config.key_file, os.path.join(os.getcwd(), "certs", "key.pem"))
        self.assertTrue(config.tracking_enabled)
        self.assertEqual(config.stats_file, os.path.join(os.getcwd(), "stats.json"))
        self.assertEqual((config.persist_interval, config.history_size), (30, 100))
        self.assertIsNone(config.source)

    def test_example_config_loads_and_matches_defaults(self):
        config = proxy.load_config(os.path.join(ROOT, "config.example.json"), environ={})
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.port, 8443)
        self.assertEqual(config.target_port, 11434)

    def test_relative_paths_resolve_against_the_config_files_directory(self):
        path = self.write({"tls": {"cert": "./c/cert.pem", "key": "k.pem"},
                           "tracking": {"statsFile": "data/stats.json"}})
        config = proxy.load_config(path, environ={})
        self.assertEqual(config.cert_file, os.path.join(self.dir, "c", "cert.pem"))
        self.assertEqual(config.key_file, os.path.join(self.dir, "k.pem"))
        self.assertEqual(config.stats_file, os.path.join(self.dir, "data", "stats.json"))

    def test_environment_overrides_the_file(self):
        path = self.write({"proxy": {"port": 9000, "allowedOrigins": "https://a.example"},
                           "target": {"host": "10.0.0.1", "port": 8080}})
        env = {"PROXY_PORT": "9443", "TARGET_HOST": "192.0.2.7", "TARGET_PORT": "3015",
               "CERT_FILE": "/etc/x/cert.pem", "KEY_FILE": "/etc/x/key.pem",
               "ALLOWED_ORIGINS": "https://studio.example, https://localhost:3000/"}
        config = proxy.load_config(path, environ=env)
        self.assertEqual(config.port, 9443)
        self.assertEqual((config.target_host, config.target_port), ("192.0.2.7", 3015))
        self.assertEqual((config.cert_file, config.key_file), ("/etc/x/cert.pem", "/etc/x/key.pem"))
        self.assertEqual(config.allowed_origins, ("https://studio.example", "https://localhost:3000"))
        self.assertTrue(config.origin_allowed("https://localhost:3000"))
        self.assertFalse(config.origin_allowed("https://evil.example"))

    def test_invalid_json_names_file_line_and_column(self):
        path = self.write('{\n  "proxy": {\n    "port": 8443,\n  }\n}\n')
        with self.assertRaises(proxy.ConfigError) as caught:
            proxy.load_config(path, environ={})
        message = str(caught.exception)
        self.assertIn(path, message)
        # Where Python's json module places the error differs by version (3.13 points at the
        # trailing comma itself); the message must carry exactly the position it reports.
        with self.assertRaises(json.JSONDecodeError) as reference:
            json.loads(open(path).read())
        self.assertIn("line %d, column %d" % (reference.exception.lineno, reference.exception.colno),
                      message)
        self.assertIn(reference.exception.lineno, (3, 4))

    def test_wrong_type_names_the_dotted_key_and_value(self):
        for section, key, value, expected in (
                ("proxy", "port", "8443", 'proxy.port must be an integer from 0 to 65535, got "8443"'),
                ("proxy", "port", 70000, "proxy.port must be an integer from 0 to 65535, got 70000"),
                ("tracking", "enabled", "yes", 'tracking.enabled must be true or false, got "yes"'),
                ("tracking", "persistInterval", -1, "tracking.persistInterval must be"),
                ("target", "host", "", 'target.host must be a non-empty string, got ""')):
            path = self.write({section: {key: value}})
            with self.assertRaises(proxy.ConfigError) as caught:
                proxy.load_config(path, environ={})
            self.assertIn(expected, str(caught.exception))
            self.assertIn(path, str(caught.exception))

    def test_bad_environment_value_names_the_variable(self):
        with self.assertRaises(proxy.ConfigError) as caught:
            proxy.load_config(None, environ={"TARGET_PORT": "eleven"}, search_cwd=False)
        self.assertIn("TARGET_PORT", str(caught.exception))
        with self.assertRaises(proxy.ConfigError) as caught:
            proxy.load_config(None, environ={"PROXY_PORT": "-1"}, search_cwd=False)
        self.assertIn("environment variable PROXY_PORT: proxy.port", str(caught.exception))

    def test_unknown_keys_warn_with_a_suggestion(self):
        # (Unknown keys in the proxy and tls sections are errors: test_mistakes.py.)
        path = self.write({"target": {"prot": 1}, "trackng": {}})
        config = proxy.load_config(path, environ={})
        self.assertEqual(len(config.warnings), 2)
        self.assertIn("'target.prot'", config.warnings[0])
        self.assertIn("did you mean 'target.port'", config.warnings[0])
        self.assertIn("did you mean 'tracking'", config.warnings[1])

    def test_missing_explicit_config_file_is_an_error(self):
        with self.assertRaises(proxy.ConfigError) as caught:
            proxy.load_config(os.path.join(self.dir, "nope.json"), environ={})
        self.assertIn("does not exist", str(caught.exception))

    def test_command_line_exits_2_with_a_one_line_error(self):
        path = self.write('{"proxy": {"port": "x"}}')
        result = subprocess.run([sys.executable, os.path.join(ROOT, "proxy.py"), "--config", path],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 2)
        self.assertTrue(result.stderr.startswith("error: "), result.stderr)
        self.assertIn("proxy.port", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


if __name__ == "__main__":
    unittest.main()
