"""Running a script exactly as ``python SCRIPT ARGS...`` would: what ``gradguard run`` executes the user's script with.

Finding what to run (a file, a ``.pyc``, a directory or zip with a ``__main__.py``), a fresh ``__main__`` module with
the values Python gives it, compiling and executing it, and printing an uncaught exception without gradguard's
frames through ``sys.excepthook``. Nothing here watches anything: ``runner`` does that around ``execute``.

Room: above the Guard. It may touch: no other module.
"""

from __future__ import annotations

import builtins
import importlib.machinery
import importlib.util
import marshal
import os
import pkgutil
import runpy
import shlex
import sys
import types
from dataclasses import dataclass

# Frames of these modules are gradguard's own, dropped from the top of an uncaught exception's traceback.
OWN_MODULES = ("gradguard.runner", "gradguard.script")


class RunError(Exception):
    """A problem with the command itself (not with the script): reported in one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Finding what to run, as the interpreter does


@dataclass(frozen=True)
class Target:
    """What ``python SCRIPT`` would run, with the values Python would give the script.

    Attributes:
        given: the path as typed; becomes ``sys.argv[0]``.
        file: the absolute path Python uses for ``__file__`` and the code's file name (the working directory
            joined to the path as typed, not normalised: ``python ./a.py`` gives ``/cwd/./a.py``).
        path0: what Python puts first on ``sys.path``.
        importer: True for a directory or zip file run through its ``__main__`` module.
    """

    given: str
    file: str
    path0: str
    importer: bool


def _python_abspath(path: str) -> str:
    # CPython (3.9+) makes the script path absolute by joining, without normalising or resolving links; doing the
    # same keeps __file__ and traceback lines byte-identical to a plain run.
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def find_target(script: str) -> Target:
    """Resolve ``script`` as the interpreter would, before anything runs (and before the script can ``chdir``).

    Raises:
        RunError: it does not exist, cannot be read, or is a directory without a ``__main__`` module.
    """
    full = _python_abspath(script)
    if not os.path.exists(full):
        raise RunError(f"no such script: {script}")
    # Python asks the import machinery first: a directory or a zip file is run through its __main__ module.
    importer = pkgutil.get_importer(full)
    if importer is not None:
        spec = importer.find_spec("__main__") if hasattr(importer, "find_spec") else None
        if spec is None:
            if not os.path.isdir(full):
                raise RunError(f"{script} is a zip file without a __main__.py: python could not run it either")
            inside = sorted(n for n in os.listdir(full) if n.endswith(".py"))[:3]
            example = shlex.quote(os.path.join(script, inside[0] if inside else "train.py"))
            raise RunError(f"{script} is a directory, not a script, and has no __main__.py for python to run; "
                           f"name the script inside it: gradguard run {example} ..."
                           + (f" (it holds {', '.join(inside)})" if inside else ""))
        return Target(script, spec.origin or full, full, importer=True)
    if os.path.isdir(full):  # an importer-less directory (unusual import hooks): Python would refuse it too
        raise RunError(f"{script} is a directory, not a script")
    if not os.access(full, os.R_OK):
        raise RunError(f"cannot read the script {script}: permission denied")
    # For a file, Python puts the directory of the script with every symbolic link resolved on sys.path.
    return Target(script, full, os.path.dirname(os.path.realpath(full)), importer=False)


def fresh_main(target: Target) -> types.ModuleType:
    """A ``__main__`` module holding what Python's own holds before the script's first line."""
    main = types.ModuleType("__main__")  # __doc__, __package__, __spec__ None as for `python script.py`
    main.__builtins__ = builtins  # type: ignore[attr-defined]  # Python's __main__ holds the module, not its dict
    main.__annotations__ = {}  # Python creates it with the module
    if not target.importer:  # runpy fills these in for a directory/zip from the module spec
        main.__file__ = target.file
        main.__cached__ = None  # type: ignore[attr-defined]
        loader = (importlib.machinery.SourcelessFileLoader if _is_pyc(target.file)
                  else importlib.machinery.SourceFileLoader)
        main.__loader__ = loader("__main__", target.file)
    return main


def _is_pyc(path: str) -> bool:
    # Python runs compiled files too: by suffix, or when the file starts with the bytecode magic number.
    if path.endswith(".pyc"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(importlib.util.MAGIC_NUMBER)) == importlib.util.MAGIC_NUMBER
    except OSError:
        return False


def _compile(target: Target) -> types.CodeType:
    """The script's code object, named by the absolute path (tracebacks then read as in a plain run)."""
    with open(target.file, "rb") as f:  # bytes: compile() honours the coding cookie and BOM as Python does
        data = f.read()
    if _is_pyc(target.file):
        return marshal.loads(data[16:])  # 16-byte header: magic, flags, and mtime+size or hash (PEP 552)
    # dont_inherit: without it the script would inherit this module's `from __future__ import annotations`.
    return compile(data, target.file, "exec", dont_inherit=True)


def execute(target: Target, main: types.ModuleType) -> None:
    """Run the script in ``main`` (already installed as ``sys.modules['__main__']``)."""
    if target.importer:
        # The interpreter runs a directory or zip through this very function (Modules/main.c, pymain_run_module):
        # using it gives the same __spec__, __file__ and traceback frames.
        runpy._run_module_as_main("__main__", alter_argv=False)  # type: ignore[attr-defined]
    else:
        code = _compile(target)
        exec(code, main.__dict__)


def trim_traceback(exc: BaseException) -> None:
    """Drop this module's frames from the top of the traceback: what is left is what Python would show."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_globals.get("__name__") in OWN_MODULES:
        tb = tb.tb_next
    # Set on the exception itself: the default sys.excepthook prints the exception's own __traceback__.
    exc.__traceback__ = tb


def print_uncaught(exc: BaseException) -> None:
    """Print an uncaught exception through ``sys.excepthook``, as the interpreter does (a hook the script set wins)."""
    try:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    except BaseException as hook_error:  # the interpreter's own words when a hook fails
        trim_traceback(hook_error)
        hook_error.__suppress_context__ = True  # the interpreter shows the two apart, not chained
        print("Error in sys.excepthook:", file=sys.stderr)
        sys.__excepthook__(type(hook_error), hook_error, hook_error.__traceback__)
        print("\nOriginal exception was:", file=sys.stderr)
        sys.__excepthook__(type(exc), exc, exc.__traceback__)


def silence_excepthook_for(exc: BaseException) -> None:
    """Let ``exc`` propagate to the interpreter without being printed a second time."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: types.TracebackType | None) -> None:
        if value is not exc:
            previous(kind, value, tb)

    sys.excepthook = hook
