#!/usr/bin/env python3
"""Run the test suite with nothing but python3: `python3 tests/run.py [-v] [name ...]`.

Plain unittest discovery (pytest also runs these files); the proxy's request log of a failing
test is printed with its traceback. Progress shows as [done/total] after every row of dots;
at the end every skipped test is listed with its reason, and the last line counts passed,
failed and skipped tests. LLM_PROXY_SOAK=1 adds the soak tests (.ci/run sets it).
"""

import os
import sys
import time
import unittest
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import support  # noqa: E402  (configures the proxy's logger to write into a buffer)


PROGRESS_EVERY = 50


class LogOnFailureResult(unittest.TextTestResult):
    """Appends the proxy's log lines to the report of each failing test, and only to those;
    prints [done/total] after every PROGRESS_EVERY tests (total set by main())."""

    total = 0

    def stopTest(self, test):
        super().stopTest(test)
        if self.dots and self.total and (self.testsRun % PROGRESS_EVERY == 0
                                         or self.testsRun == self.total):
            self.stream.write(" [%d/%d]\n" % (self.testsRun, self.total))
            self.stream.flush()

    def startTest(self, test):
        support.LOG_BUFFER.seek(0)
        support.LOG_BUFFER.truncate()
        super().startTest(test)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._attach_log(self.failures)

    def addError(self, test, err):
        super().addError(test, err)
        self._attach_log(self.errors)

    def _attach_log(self, reports):
        logged = support.LOG_BUFFER.getvalue()
        if logged and reports:
            test, text = reports[-1]
            reports[-1] = (test, text + "\nproxy log:\n" + logged[-20000:])


def main(argv):
    verbosity = 2 if "-v" in argv else 1
    names = [a for a in argv if not a.startswith("-")]
    warnings.simplefilter("ignore", ResourceWarning)
    loader = unittest.TestLoader()
    suite = loader.loadTestsFromNames(names) if names else loader.discover(HERE, pattern="test_*.py")
    LogOnFailureResult.total = suite.countTestCases()
    runner = unittest.TextTestRunner(verbosity=verbosity, resultclass=LogOnFailureResult)
    started = time.monotonic()
    result = runner.run(suite)
    if result.skipped:
        print("skipped, and why:")
        for test, reason in result.skipped:
            print("  %s: %s" % (test.id(), reason))
    # Count tests, not reports: one test with several failing subtests is one failed test.
    failed = len({getattr(test, "test_case", test).id()
                  for test, _ in result.failures + result.errors}) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = max(0, result.testsRun - failed - skipped)
    print("tests took %.1fs" % (time.monotonic() - started))
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
