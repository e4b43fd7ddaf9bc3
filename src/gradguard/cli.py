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
    demo.add_argument("story", nargs="?", choices=["all", "gradients", "modes"], default="all",
                      help="gradients: vanishing/healthy/exploding runs; modes: train vs. inference mistakes")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as gradients_demo
        from .demo_modes import main as modes_demo

        code = gradients_demo() if args.story in ("all", "gradients") else 0
        return code or (modes_demo() if args.story in ("all", "modes") else 0)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
