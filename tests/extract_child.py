"""Child process of the SIGKILL resume test: `mir extract` slowed down per batch.

The slowdown (a sleep before each batch is prepared) only widens the window in which the parent
can kill the process mid-run; the extraction code itself is untouched.
"""
import os
import sys
import time

import extract.runner as runner

_prepare = runner.BatchPreparer.prepare


def _slow_prepare(self, samples):
    time.sleep(float(os.environ.get("MIR_TEST_BATCH_DELAY", "0.3")))
    return _prepare(self, samples)


runner.BatchPreparer.prepare = _slow_prepare

if __name__ == "__main__":
    from pipelines.cli import main

    main(sys.argv[1:])
