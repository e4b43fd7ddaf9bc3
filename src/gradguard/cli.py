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
    sub.add_parser("demo", help="train three small models on bundled digits and print gradguard's diagnoses")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main()
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
