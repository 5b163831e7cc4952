"""``python -m prunelab.report <sweep folder> [--metric ...] [--out DIR]``: tables, plots, incomplete and
never-launched jobs, written to ``<sweep folder>/report/`` unless ``--out`` says otherwise."""

from __future__ import annotations

import argparse
import logging
import sys

from prunelab.report import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prunelab.report", description=__doc__)
    parser.add_argument("folder", help="sweep folder (e.g. multirun/2025-01-01/12-00-00); searched recursively")
    parser.add_argument("--metric", action="append", default=None,
                        help="ppl (every dataset), ppl:<dataset> (e.g. ppl:wikitext2) or zeroshot; repeat or "
                             "separate with commas; default: ppl and zeroshot")
    parser.add_argument("--out", default=None, help="output folder (default: <folder>/report)")
    parser.add_argument("--acc-key", default="acc", choices=("acc", "acc_norm"), help="zero-shot accuracy per task")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = [m.strip() for item in args.metric or [] for m in item.split(",") if m.strip()] or None
    try:
        result = build_report(args.folder, args.out, metrics, acc_key=args.acc_key, plots=not args.no_plots)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    logging.getLogger("prunelab.report").info("report: %s (%d runs, %d incomplete, %d never launched)",
                                              result["markdown"], result["runs"], len(result["incomplete"]),
                                              len(result["never_launched"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
