"""Write the offline task YAMLs for lm-eval's command line.

    python -m prunelab.eval.tasks DEST [TASK ...]
    lm_eval --include_path DEST --tasks arc_easy_offline,...

Prints the ``--tasks`` value for the tasks written.
"""

from __future__ import annotations

import argparse
import sys

from prunelab.eval.tasks import offline_task_names, write_offline_tasks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prunelab.eval.tasks", description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="folder to write the YAMLs into (lm-eval --include_path)")
    parser.add_argument("tasks", nargs="*", help=f"lm-eval task names (default: all of {', '.join(offline_task_names())})")
    args = parser.parse_args(argv)
    written = write_offline_tasks(args.dest, args.tasks or None)
    sys.stdout.write(",".join(written.values()) + "\n")  # the --tasks value, for shell use
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
