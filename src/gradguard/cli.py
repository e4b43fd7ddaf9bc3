"""Command line: ``gradguard run | report | demo``.

Room: above the Guard. It may touch: ``demo``, ``gradguard``, ``report.html``, ``runner``.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__

RUN_USAGE = "gradguard run [-h] [--out DIR] [--log-every N] [--repair] [--stochastic NAME] SCRIPT [ARGS...]"
RUN_VALUE_OPTIONS = ("--out", "--log-every", "--stochastic")  # the run options that take a value (the next word)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _split_run_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``run [OPTIONS] SCRIPT ARGS...`` into gradguard's words (through SCRIPT) and the script's.

    argparse's REMAINDER drops a '--' among the script's arguments; python passes it on, so the script's words
    are cut off here, untouched, at the first word that is not one of gradguard's options.
    """
    i = 1
    while i < len(argv):
        word = argv[i]
        if word == "--":  # everything after it is the script and its arguments
            return argv[: i + 2], argv[i + 2:]
        if not word.startswith("-") or word == "-":
            return argv[: i + 1], argv[i + 1:]
        i += 2 if word in RUN_VALUE_OPTIONS else 1
    return argv, []


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradguard`` command. Returns the exit code."""
    parser = argparse.ArgumentParser(prog="gradguard", description="Keep the training of deep networks healthy.")
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="small trainings on bundled digits with gradguard's diagnoses printed")
    demo.add_argument("story", nargs="?", choices=["all", "vanishing", "exploding", "modes"], default="all",
                      help="which phenomenon to show with its fix (default: all)")
    demo.add_argument("--out", default="gradguard-demo", help="where run directories and reports go")
    run = sub.add_parser("run", help="run an unmodified training script with gradguard watching every optimizer",
                         usage=RUN_USAGE, allow_abbrev=False,  # abbreviations would defeat _split_run_argv
                         epilog="Everything after SCRIPT is the script's, passed on unchanged ('--' included).")
    run.add_argument("--out", metavar="DIR", help="run directory (default: a new folder under ./gradguard-runs/)")
    run.add_argument("--log-every", metavar="N", type=_positive_int, default=10,
                     help="steps between statistics reads (default 10)")
    run.add_argument("--repair", action="store_true", help="repair while training runs (Guard(repair='auto'))")
    run.add_argument("--stochastic", metavar="NAME", action="append", default=[],
                     help="a module that samples on purpose in eval mode (a VAE's sampler), by the name gradguard "
                          "prints ('(root)': the model itself); repeatable (Guard(stochastic=[...]))")
    # Optional for argparse so that a missing script gets our message, not "required: script, script_args".
    run.add_argument("script", nargs="?", metavar="SCRIPT",
                     help="the Python script to run (or a directory/zip with a __main__.py, as python takes)")
    report = sub.add_parser("report", help="write a self-contained HTML report of a run directory")
    report.add_argument("run_dir")
    report.add_argument("-o", "--output", help="the HTML file (default: RUN_DIR/report.html)")
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if argv[:1] == ["run"]:
        argv, script_args = _split_run_argv(argv)
    args = parser.parse_args(argv)
    if args.command == "run":
        from .runner import RunError
        from .runner import run as run_script

        if args.script is None:
            run.error("no script given; name the script to run and its arguments, as for python: "
                      "gradguard run train.py --epochs 3")
        try:
            return run_script(args.script, script_args, args.out, args.log_every, args.repair, args.stochastic)
        except RunError as e:
            print(f"gradguard run: {e}", file=sys.stderr)
            return 2
    if args.command == "report":
        from .report.html import report_command

        return report_command(args.run_dir, args.output)  # one line on bad input, never a traceback
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args.story, args.out)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
