"""Command line: ``gradguard demo``."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradguard`` command. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="gradguard", description="Keep the training of deep networks healthy.")
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="small trainings on bundled digits with gradguard's diagnoses printed")
    demo.add_argument("story", nargs="?", choices=["all", "vanishing", "exploding", "modes"], default="all",
                      help="which phenomenon to show with its fix (default: all)")
    demo.add_argument("--out", default="gradguard-demo", help="where run directories and reports go")
    run = sub.add_parser("run", help="run an unmodified training script with gradguard watching every optimizer")
    run.add_argument("--out", help="run directory (default: a new folder under ./gradguard-runs/)")
    run.add_argument("--log-every", type=int, default=10, help="steps between statistics reads (default 10)")
    run.add_argument("--repair", action="store_true", help="repair while training runs (Guard(repair='auto'))")
    run.add_argument("script", help="the Python script to run")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments, passed through unchanged")
    report = sub.add_parser("report", help="write a self-contained HTML report of a run directory")
    report.add_argument("run_dir")
    report.add_argument("-o", "--output", help="the HTML file (default: RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    if args.command == "run":
        from .runner import RunError
        from .runner import run as run_script

        try:
            return run_script(args.script, args.script_args, args.out, args.log_every, args.repair)
        except RunError as e:
            print(f"gradguard run: {e}", file=sys.stderr)
            return 2
    if args.command == "report":
        from .report.html import ReportError, load_run, summary, write_report

        try:
            path = write_report(args.run_dir, args.output)
        except ReportError as e:
            print(f"gradguard report: {e}", file=sys.stderr)
            return 2
        print(summary(load_run(args.run_dir)))
        print(f"wrote {path}")
        return 0
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args.story, args.out)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
