"""A test-only code location (heimdex_assets_tests/test_run_queue.py): runs that hold, die or fail on cue, so the
production run queue and run retries can be watched without models or application data.

``QUEUE_TEST_DIR`` (set by the test) is where a held run leaves its worker's pid and waits for its release file.
"""

import os
import time
from pathlib import Path

import dagster as dg

HOLD_TIMEOUT_S = 120  # a forgotten release fails the run instead of leaving it running after the test


@dg.op
def hold(context: dg.OpExecutionContext) -> None:
    """Writes the run worker's pid to ``<run id>.pid``, then waits for the test to write ``<run id>.release``."""
    folder = Path(os.environ["QUEUE_TEST_DIR"])
    (folder / f"{context.run_id}.pid").write_text(str(os.getpid()))
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not (folder / f"{context.run_id}.release").exists():
        if time.monotonic() > deadline:
            raise dg.Failure(description=f"not released within {HOLD_TIMEOUT_S} s", allow_retries=False)
        time.sleep(0.2)


# In-process executor: the op runs in the run worker itself, so killing the pid it wrote kills the worker.
@dg.job(executor_def=dg.in_process_executor)
def hold_job() -> None:
    hold()


@dg.asset
def failing_asset() -> None:
    """Fails as a bad input would: an asset failure, which run retries must leave alone."""
    raise RuntimeError("failing_asset fails on purpose")


fail_job = dg.define_asset_job("fail_job", selection=[failing_asset], executor_def=dg.in_process_executor)

defs = dg.Definitions(jobs=[hold_job, fail_job], assets=[failing_asset])
