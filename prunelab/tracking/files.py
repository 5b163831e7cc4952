"""The names of the files a run leaves in its folder, in one place (the runner writes them, the report and
the sweep summary read them)."""

RESULTS_FILE = "results.json"  # written once, atomically, when every step finished (status "complete")
FAILED_FILE = "failed.json"  # a failed or interrupted run: the phase and the error
SKIPPED_FILE = "skipped.json"  # the last invocation found a complete results.json of the same config and ran nothing
COMPLETE = "complete"  # results.json's status
