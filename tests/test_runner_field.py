"""gradguard run against plain python: the same script, run both ways, must give the same exit status, stdout and
stderr (less gradguard's own "[gradguard]" lines). Plain python is the oracle here, never gradguard's own output.

Each case writes a small script to tmp_path and runs it as ``python SCRIPT`` and ``python -m gradguard run SCRIPT``
in subprocesses (one interpreter start with torch is a few seconds on a small CPU; scripts that need no torch skip
its import in the plain run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PY = sys.executable
TIMEOUT = 300


def plain(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python SCRIPT ARGS...``: the oracle."""
    return subprocess.run([PY, script, *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def guarded(script: str, *args: str, cwd: Path, out: str = "run", opts: tuple[str, ...] = ()
            ) -> subprocess.CompletedProcess[str]:
    """``python -m gradguard run --out OUT [OPTS] SCRIPT ARGS...``."""
    cmd = [PY, "-m", "gradguard", "run", "--out", out, *opts, script, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def own_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[gradguard]")]


def without_own_lines(stderr: str) -> str:
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("[gradguard]"))


def assert_same_as_python(p: subprocess.CompletedProcess[str], g: subprocess.CompletedProcess[str]) -> None:
    assert g.returncode == p.returncode, g.stderr
    assert g.stdout == p.stdout
    assert without_own_lines(g.stderr) == p.stderr


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip())
    return path


# ---------------------------------------------------------------------------------------------------------------
# Exit status, traceback, stdout and stderr


ENDINGS = {
    # A chained exception raised in a function: the traceback (both parts) must show only the script's frames.
    "exception": """
        import sys
        def load():
            try:
                1 / 0
            except ZeroDivisionError as e:
                raise ValueError("the script's own bug") from e
        print("before the crash")
        print("a line on stderr", file=sys.stderr)
        load()
    """,
    "exit_message": """
        import sys
        print("out")
        sys.exit("fatal: no data")
    """,
    "exit_code_wraps": """
        print("out")
        raise SystemExit(300)
    """,
    # Python ends an interrupted program by SIGINT, after the atexit handlers.
    "keyboard_interrupt": """
        import atexit
        atexit.register(print, "atexit ran")
        print("working")
        raise KeyboardInterrupt
    """,
    "syntax_error": """
        print("never runs")
        x = (
    """,
    # A hook the script installs is the one that prints its uncaught exception.
    "own_excepthook": """
        import sys
        sys.excepthook = lambda kind, value, tb: print(f"custom hook: {kind.__name__}: {value}", file=sys.stderr)
        raise RuntimeError("handled by the script's hook")
    """,
    "broken_excepthook": """
        import sys
        def hook(kind, value, tb):
            raise OSError("the hook itself fails")
        sys.excepthook = hook
        raise ValueError("the original error")
    """,
}


@pytest.mark.parametrize("case", sorted(ENDINGS))
def test_exit_status_and_output_are_pythons(tmp_path: Path, case: str) -> None:
    write(tmp_path / "job.py", ENDINGS[case])
    p, g = plain("job.py", cwd=tmp_path), guarded("job.py", cwd=tmp_path)
    assert_same_as_python(p, g)
    assert own_lines(g.stderr)[-1].startswith("[gradguard] watched nothing")


# ---------------------------------------------------------------------------------------------------------------
# What the script sees: __file__, sys.argv, sys.path[0], __main__


SHOW = """
    import os
    import pickle
    import sys

    import helper  # beside the script: importable because sys.path[0] is the script's directory

    class Point:
        def __init__(self, x):
            self.x = x

    def f(a: list[int]) -> None: ...

    print("argv", sys.argv)
    print("file", __file__, os.path.isabs(__file__))
    print("path0", sys.path[0])
    print("code", sys._getframe().f_code.co_filename)
    print("module", __name__, __spec__, __package__, __cached__, __doc__)
    print("loader", type(__loader__).__name__, __loader__.name, __loader__.path)
    print("builtins", type(__builtins__).__name__, __annotations__)
    print("globals", sorted(globals()))
    import __main__
    print("main", vars(__main__) is globals())
    print("pickle", pickle.loads(pickle.dumps(Point(3))).x)  # classes of __main__ pickle by name
    print("no inherited __future__", f.__annotations__)
    print("helper", helper.VALUE)
"""


@pytest.mark.parametrize("as_typed", ["./sub/show.py", "link/show.py"])
def test_script_sees_what_python_gives_it(tmp_path: Path, as_typed: str) -> None:
    write(tmp_path / "sub" / "show.py", SHOW)
    write(tmp_path / "sub" / "helper.py", "VALUE = 42\n")
    (tmp_path / "link").symlink_to(tmp_path / "sub")  # sys.path[0] has its links resolved, __file__ does not
    args = ("--", "--out", "x", "-h")  # gradguard's own option names and '--' belong to the script here
    p, g = plain(as_typed, *args, cwd=tmp_path), guarded(as_typed, *args, cwd=tmp_path)
    assert_same_as_python(p, g)
    assert "argv ['" + as_typed + "', '--', '--out', 'x', '-h']" in g.stdout


def test_directory_with_main_runs_as_python_runs_it(tmp_path: Path) -> None:
    write(tmp_path / "app" / "__main__.py", """
        import sys
        import helper
        print(sys.argv, __file__, __spec__.name, __package__ == "", sys.path[0], helper.VALUE)
        raise ValueError("inside the app")
    """)
    write(tmp_path / "app" / "helper.py", "VALUE = 7\n")
    p, g = plain("app", "a", cwd=tmp_path), guarded("app", "a", cwd=tmp_path)
    assert_same_as_python(p, g)  # runpy's frames included: python shows them for a directory too
    assert "ValueError: inside the app" in g.stderr


# ---------------------------------------------------------------------------------------------------------------
# chdir, relative --out, runs without steps


def test_chdir_then_files_beside_the_script_and_relative_out(tmp_path: Path) -> None:
    write(tmp_path / "proj" / "data.txt", "hello\n")
    write(tmp_path / "proj" / "train.py", """
        import os
        import torch
        torch.set_num_threads(1)
        torch.manual_seed(0)
        here = os.path.dirname(__file__)
        os.makedirs(os.path.join(here, "work"), exist_ok=True)
        os.chdir(os.path.join(here, "work"))  # before the first step: --out must not follow it
        with open(os.path.join(here, "data.txt")) as f:
            print("read", f.read().strip())
        m = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(4):
            opt.zero_grad()
            m(torch.randn(4, 3)).square().mean().backward()
            opt.step()
        print("weights", [round(v, 5) for v in m.weight.flatten().tolist()])
    """)
    p = plain("proj/train.py", cwd=tmp_path)
    g = guarded("proj/train.py", cwd=tmp_path, out="runs/r", opts=("--log-every", "1"))
    assert p.returncode == 0, p.stderr
    assert_same_as_python(p, g)
    run_dir = tmp_path / "runs" / "r"  # relative to where gradguard was started, not to where the script went
    assert json.loads((run_dir / "meta.json").read_text())["model"] == "Linear"
    assert [json.loads(x)["step"] for x in (run_dir / "stats.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert not (tmp_path / "proj" / "work" / "runs").exists()
    assert own_lines(g.stderr)[-1].endswith(f"run directory runs{os.sep}r{os.sep} (gradguard report runs/r)")


NO_STEP = {
    "no_optimizer": 'print("nothing to train here")\n',
    # An optimizer over a bare tensor: no module owns it, so nothing can be watched; the script must not notice.
    "no_model": """
        import torch
        torch.set_num_threads(1)
        w = torch.zeros(3, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            (w - 1).square().sum().backward()
            opt.step()
        print([round(v, 5) for v in w.tolist()])
    """,
}


@pytest.mark.parametrize("case", sorted(NO_STEP))
def test_unwatched_run_leaves_a_readable_run_directory(tmp_path: Path, case: str) -> None:
    write(tmp_path / "job.py", NO_STEP[case])
    p, g = plain("job.py", cwd=tmp_path), guarded("job.py", cwd=tmp_path)
    assert_same_as_python(p, g)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["schema"] == 1 and meta["model"] is None and meta["layers"] == []
    assert (tmp_path / "run" / "stats.jsonl").read_text() == (tmp_path / "run" / "events.jsonl").read_text() == ""
    from gradguard.report.html import load_run

    run = load_run(tmp_path / "run")  # a reader sees a run of no steps, not a broken directory
    assert run.stats == [] and run.events == []
    last = own_lines(g.stderr)[-1]
    assert last.startswith("[gradguard] watched nothing") and "gradguard report" not in last


def test_rerun_into_the_same_out_replaces_the_earlier_logs(tmp_path: Path) -> None:
    write(tmp_path / "job.py", 'print("nothing")\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stats.jsonl").write_text('{"step": 0}\n')  # an earlier run's rows: JSONL appends
    (tmp_path / "run" / "notes.txt").write_text("mine")
    g = guarded("job.py", cwd=tmp_path)
    assert g.returncode == 0, g.stderr
    assert (tmp_path / "run" / "stats.jsonl").read_text() == ""
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only gradguard's own files are replaced


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


COMPILED = """
    import torch
    from torch import nn
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    compiled = torch.compile(model{backend})
    opt = torch.optim.SGD(compiled.parameters(), lr=0.05)
    x = torch.randn(32, 4)
    y = x.sum(1, keepdim=True)
    for step in range(6):
        opt.zero_grad()
        (compiled(x) - y).square().mean().backward()
        # the oracle: the total gradient norm computed here, by torch, from the gradients the step will apply
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        print(f"step {{step}} grad norm {{norm.item():.6e}}")
        opt.step()
"""


def check_compiled_run(tmp_path: Path, backend: str) -> None:
    write(tmp_path / "job.py", COMPILED.format(backend=backend))
    p = plain("job.py", cwd=tmp_path)
    g = guarded("job.py", cwd=tmp_path, opts=("--log-every", "1"))
    assert p.returncode == 0, p.stderr
    assert_same_as_python(p, g)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert (meta["model"], meta["optimizer"]) == ("Sequential", "SGD")
    assert [lay["name"] for lay in meta["layers"]] == ["0", "2"]  # no "_orig_mod." prefix
    rows = [json.loads(x) for x in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    expected = [float(line.split()[-1]) for line in p.stdout.splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    assert [r["total_grad_norm"] for r in rows] == pytest.approx(expected, rel=1e-5)
    assert "watched Sequential (compiled) + SGD" in g.stderr


def test_compiled_model_is_found_and_watched(tmp_path: Path) -> None:
    check_compiled_run(tmp_path, ', backend="eager"')  # dynamo traces the model; no C compiler needed


@pytest.mark.skipif(not os.environ.get("GRADGUARD_SLOW_TESTS") or shutil.which("cc") is None,
                    reason="inductor compiles C++ (tens of seconds on a small CPU): set GRADGUARD_SLOW_TESTS=1")
def test_compiled_model_with_inductor_is_found_and_watched(tmp_path: Path) -> None:
    check_compiled_run(tmp_path, "")


# ---------------------------------------------------------------------------------------------------------------
# A failure inside gradguard


def test_a_failing_guard_leaves_the_script_alone(tmp_path: Path) -> None:
    write(tmp_path / "job.py", """
        import torch
        torch.set_num_threads(1)
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            m(torch.ones(2, 3)).square().sum().backward()
            opt.step()
        print([round(v, 5) for v in m.weight.flatten().tolist()])
    """)
    # The Guard is replaced by one that fails as it attaches: the runner must say so once and stand aside.
    boom = ("import sys\nimport gradguard.runner as r\n"
            "class Boom:\n    def __init__(self, *a, **k):\n        raise RuntimeError('boom')\n"
            "r.Guard = Boom\nfrom gradguard.cli import main\nsys.exit(main(['run', '--out', 'run', 'job.py']))\n")
    g = subprocess.run([PY, "-c", boom], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    p = plain("job.py", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert_same_as_python(p, g)
    assert own_lines(g.stderr) == [
        "[gradguard] could not watch SGD (RuntimeError: boom); the script runs on, unwatched",
        "[gradguard] watched nothing: no optimizer it stepped could be watched (SGD); run directory run/ holds no "
        "statistics"]


# ---------------------------------------------------------------------------------------------------------------
# Loops without a torch.optim optimizer


HAND_SGD = """
    import torch
    from torch import nn
    from torch.nn.utils import clip_grad_norm_
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for step in range(12):
        loss = nn.functional.mse_loss(model(x), y)
        model.zero_grad()
        loss.backward()
        norm = clip_grad_norm_(model.parameters(), 0.05)  # the oracle: the pre-clip norm, torch's own number
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.1)
        print(f"{step} {loss.item():.6e} {norm.item():.6e}")
"""


def test_a_hand_written_sgd_loop_is_watched(tmp_path: Path) -> None:
    """No torch.optim optimizer (teaching code, older examples): found at its first backward (no live optimizer
    holds the parameters), every backward a step; loss and pre-clip norms are the script's own."""
    write(tmp_path / "job.py", HAND_SGD)
    p = plain("job.py", cwd=tmp_path)
    g = guarded("job.py", cwd=tmp_path, opts=("--log-every", "1"))
    assert p.returncode == 0, p.stderr
    assert_same_as_python(p, g)
    rows = [json.loads(x) for x in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    printed = [line.split() for line in p.stdout.splitlines()]
    assert [r["step"] for r in rows] == list(range(12))  # every step of the script, the first included
    assert [r["loss"] for r in rows] == pytest.approx([float(s[1]) for s in printed], rel=1e-5)
    assert [r["total_grad_norm"] for r in rows] == pytest.approx([float(s[2]) for s in printed], rel=1e-5)
    assert all(r["script_clip_max_norm"] == 0.05 for r in rows)
    assert "watched Sequential + no optimizer" in own_lines(g.stderr)[-1]
