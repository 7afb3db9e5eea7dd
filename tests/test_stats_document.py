"""Issue 13 items 3, 4 and 7 (part): the request record handed to stats, the stats document
(whose JSON is stats.json, loaded in one walk), and the one atomic writer."""

from support import proxy

import json
import os
import shutil
import stat
import tempfile
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))


def _tmpdir(test):
    directory = tempfile.mkdtemp(prefix="llm-proxy-statsdoc-")
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


class TestOneAtomicWriter(unittest.TestCase):
    """Certificates, stats.json and the --add-key config writer share _write_file_atomic()."""

    def test_stats_save_goes_through_the_one_writer(self):
        path = os.path.join(_tmpdir(self), "stats.json")
        store = proxy.StatsStore(path=path)
        store.reset()                                  # something to save
        real = proxy._write_file_atomic
        with mock.patch.object(proxy, "_write_file_atomic", side_effect=real) as writer:
            self.assertTrue(store.save())
        writer.assert_called_once()
        self.assertEqual(writer.call_args[0][0], path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)
        self.assertFalse(hasattr(proxy, "_stats_atomic_write"))

    def test_stats_save_does_not_create_a_missing_folder(self):
        # A wrong stats path is reported (lastError), not silently created.
        path = os.path.join(_tmpdir(self), "missing", "stats.json")
        store = proxy.StatsStore(path=path)
        store.reset()
        self.assertFalse(store.save())
        self.assertFalse(os.path.exists(os.path.dirname(path)))
        self.assertIn("cannot save stats", store.snapshot()["persistence"]["lastError"])

    def test_add_key_config_goes_through_the_one_writer(self):
        config = os.path.join(_tmpdir(self), "config.json")
        real = proxy._write_file_atomic
        with mock.patch.object(proxy, "_write_file_atomic", side_effect=real) as writer:
            proxy._write_config_document(config, {"access": {"keys": {}}})
        self.assertEqual(writer.call_args[0][0], config)
        self.assertTrue(writer.call_args[1]["private"])
        self.assertEqual(stat.S_IMODE(os.stat(config).st_mode), 0o600)

    def test_stale_temp_files_use_the_writers_naming(self):
        # The clean-up removes exactly what an interrupted _write_file_atomic() leaves.
        directory = _tmpdir(self)
        path = os.path.join(directory, "cert.pem")
        real_replace = os.replace

        def killed(src, dst):
            raise KeyboardInterrupt         # stands for a kill between write and rename
        with mock.patch.object(proxy.os, "replace", killed), \
                mock.patch.object(proxy.os, "unlink", side_effect=OSError("gone")):
            with self.assertRaises(KeyboardInterrupt):
                proxy._write_file_atomic(path, b"pem", private=False)
        left = [n for n in os.listdir(directory) if n.endswith(".tmp")]
        self.assertEqual(len(left), 1, left)
        other = os.path.join(directory, ".key.pem.abc.tmp")
        open(other, "w").close()
        proxy.remove_stale_temp_files(path)
        self.assertEqual(sorted(os.listdir(directory)), [".key.pem.abc.tmp"])
        self.assertIs(os.replace, real_replace)


if __name__ == "__main__":
    unittest.main()
