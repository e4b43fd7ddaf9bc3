"""The field corpus: realistic training scripts (tests/field/*.py, none named test_*, so pytest never imports them)
run as ``python SCRIPT`` and as ``python -m gradguard run SCRIPT``, unmodified.

The oracles are plain python and the scripts' own printed numbers, never gradguard's output alone:

- healthy flags: the guarded run prints exactly what the plain run prints (stdout, stderr less gradguard's own
  lines, exit status); the script's own losses show that it learned; gradguard watched it (a model in meta.json,
  statistics rows with the loss it read from ``.backward()``) and raised no exploding/vanishing/nonfinite/stalled
  diagnosis.
- a learning rate 100-1000x too high, injected through the script's own ``--lr``: the script's printed loss shows
  where the run went wrong (the first printed step whose loss is non-finite or more than twice the loss of step
  0), and gradguard must name an exploding/nonfinite/stalled step no later than one statistics read
  (``--log-every``, 10 steps) after it.

Each case runs the plain and the guarded interpreter side by side (two processes, one thread each): one torch
start-up is a few seconds on a small CPU, and every assertion about a pair of runs is made on that one pair.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PY = sys.executable
HERE = Path(__file__).resolve().parent
TIMEOUT = 300
LOG_EVERY = 10  # gradguard run's default --log-every: it reads statistics (and judges them) this often
NEAR = LOG_EVERY  # a fault's diagnosis may name a step at most one read after the loss shows it
BLOWUP = 2.0  # a printed loss above this multiple of the step-0 loss (or non-finite) means the run went wrong
ALARMS = {"exploding", "vanishing", "nonfinite", "stalled"}  # must stay silent on healthy runs
FAULT_KINDS = {"exploding", "nonfinite", "stalled"}
STEP_LINE = re.compile(r"^step\s+(\d+)\s+loss\s+(\S+)", re.MULTILINE)  # the format every script prints


@dataclass(frozen=True)
class Script:
    lr: float  # the healthy learning rate (the script's default, passed explicitly so a fault is an exact multiple)
    fault_steps: int  # --steps for a fault run: the blow-up and at least NEAR steps after it (checked)


SCRIPTS = {
    "char_gpt": Script(lr=3e-3, fault_steps=30),
    "word_lm_sgd": Script(lr=10.0, fault_steps=30),
    "lstm_lbfgs": Script(lr=0.8, fault_steps=12),
    "gpt_dataloader": Script(lr=5e-3, fault_steps=30),
    "amp_accum": Script(lr=0.05, fault_steps=30),
    "ema_checkpoint": Script(lr=0.05, fault_steps=30),
}

# (script, factor): the learning rate times `factor`. x100 where it already throws the script's loss up; x1000
# too except where x100 is not a fault at all (char_gpt's warm-up and clipping absorb x100: its loss only stalls
# near 3.1 and never reaches twice its start) or x100 is already a non-finite loss at step 1 (L-BFGS).
FAULTS = [
    ("char_gpt", 1000),
    ("word_lm_sgd", 100),
    ("word_lm_sgd", 1000),
    ("lstm_lbfgs", 100),
    ("gpt_dataloader", 100),
    ("gpt_dataloader", 1000),
    # GradScaler + accumulation at x100 swings (2.3, 3.4, 7.4, 2.8 ...) and never reaches 10x its first loss: the
    # early rule's "loss 2x and norm 10x on two steps" names it (the spike rule alone came at step 13, too late).
    ("amp_accum", 100),
    ("amp_accum", 1000),
    ("ema_checkpoint", 100),
    ("ema_checkpoint", 1000),
]


# ---------------------------------------------------------------------------------------------------------------
# Running a script both ways


@dataclass
class Pair:
    plain: subprocess.CompletedProcess[str]
    guarded: subprocess.CompletedProcess[str]
    run_dir: Path


def run_both(name: str, args: list[str], tmp_path: Path) -> Pair:
    """``python SCRIPT ARGS`` and ``python -m gradguard run --out run SCRIPT ARGS``, concurrently, in tmp_path.

    The script is copied there first: whatever it does beside itself (ema_checkpoint reads its own source through
    ``__file__``) happens in the copy, never in the repository.
    """
    script = tmp_path / f"{name}.py"
    shutil.copyfile(HERE / script.name, script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the scripts set one thread themselves; this covers start-up
    cmds = [[PY, script.name, *args], [PY, "-m", "gradguard", "run", "--out", "run", script.name, *args]]
    procs = [subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    done = []
    for cmd, proc in zip(cmds, procs):
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return Pair(done[0], done[1], tmp_path / "run")


GG_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: gradguard")  # warnings.warn(...) from gradguard: "gradguard ..."


def script_stderr(stderr: str) -> str:
    """The guarded run's stderr less what gradguard adds: its "[gradguard] ..." lines, each with the indented lines
    of its block (a diagnosis prints its message and fix below its head line), and its own warnings."""
    kept, in_block = [], False
    for line in stderr.splitlines(keepends=True):
        if line.startswith("[gradguard]") or GG_WARNING.match(line):
            in_block = True
            continue
        if in_block and line.startswith("  "):
            continue
        in_block = False
        kept.append(line)
    return "".join(kept)


def assert_same_as_python(pair: Pair) -> None:
    p, g = pair.plain, pair.guarded
    assert p.returncode == 0, f"the script itself failed:\n{p.stderr[-3000:]}"
    assert "GuardInternalWarning" not in g.stderr, f"gradguard switched itself off:\n{g.stderr[-3000:]}"
    assert g.returncode == p.returncode, g.stderr[-3000:]
    assert g.stdout == p.stdout
    assert script_stderr(g.stderr) == p.stderr


# ---------------------------------------------------------------------------------------------------------------
# What the script printed, and what gradguard wrote


def printed_losses(stdout: str) -> list[tuple[int, float]]:
    """(step, loss) from the script's own ``step N loss X`` lines; 'nan' and 'inf' parse as floats."""
    return [(int(s), float(v)) for s, v in STEP_LINE.findall(stdout)]


def first_blowup(losses: list[tuple[int, float]]) -> int | None:
    """The first printed step whose loss is non-finite or above BLOWUP times the loss printed for step 0."""
    assert losses and losses[0][0] == 0, "the script must print the loss of step 0"
    start = losses[0][1]
    for step, loss in losses[1:]:
        if not math.isfinite(loss) or loss > BLOWUP * start:
            return step
    return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def diagnoses(run_dir: Path) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e.get("type") == "diagnosis"]


def describe(pair: Pair) -> str:
    """What a failure message needs: gradguard's events and per-row loss/total norm, and the script's losses."""
    rows = read_jsonl(pair.run_dir / "stats.jsonl") if (pair.run_dir / "stats.jsonl").is_file() else []
    events = read_jsonl(pair.run_dir / "events.jsonl") if (pair.run_dir / "events.jsonl").is_file() else []
    lines = ["events.jsonl:"]
    lines += [f"  {e.get('type')} {e.get('kind')} step {e.get('step')}: {str(e.get('message', e.get('detail')))[:240]}"
              for e in events] or ["  (none)"]
    lines.append("stats.jsonl (step, loss, total_grad_norm, total_grad_norm_max):")
    lines += [f"  {r.get('step')} {r.get('loss')} {r.get('total_grad_norm')} {r.get('total_grad_norm_max')}"
              for r in rows] or ["  (none)"]
    lines.append("script's printed losses: " + ", ".join(f"{s}:{v:.4g}" for s, v in
                                                          printed_losses(pair.plain.stdout)[:40]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Healthy: same output, watched, silent


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_healthy_run_is_pythons_watched_and_silent(tmp_path: Path, name: str) -> None:
    spec = SCRIPTS[name]
    pair = run_both(name, ["--lr", repr(spec.lr), "--seed", "0"], tmp_path)
    assert_same_as_python(pair)

    # The script's own numbers say it trained: finite losses, the last well below the first. Silence from gradguard
    # only means something on a run that is healthy by its own account.
    losses = printed_losses(pair.plain.stdout)
    assert len(losses) >= 2 and all(math.isfinite(v) for _, v in losses), pair.plain.stdout
    assert losses[-1][1] < 0.75 * losses[0][1], pair.plain.stdout

    # Watched: gradguard found the model, wrote statistics, and read the loss from the script's backward.
    meta = json.loads((pair.run_dir / "meta.json").read_text())
    assert meta.get("model") is not None, f"not watched: {pair.guarded.stderr[-2000:]}"
    rows = read_jsonl(pair.run_dir / "stats.jsonl")
    assert rows, f"no statistics rows\n{pair.guarded.stderr[-2000:]}"
    no_loss = [r["step"] for r in rows if r.get("loss") is None]
    assert not no_loss, f"rows without a loss at steps {no_loss}\n{describe(pair)}"

    # Silent.
    alarms = [d for d in diagnoses(pair.run_dir) if d.get("kind") in ALARMS]
    assert not alarms, f"false alarm on a healthy run\n{describe(pair)}"


# ---------------------------------------------------------------------------------------------------------------
# Learning rate far too high: diagnosed where the script's own loss went wrong


@pytest.mark.parametrize(("name", "factor"), FAULTS,
                         ids=[f"{n}-lr_x{f}" for n, f in (p.values if hasattr(p, "values") else p for p in FAULTS)])
def test_learning_rate_fault_is_diagnosed_where_the_loss_blew_up(tmp_path: Path, name: str, factor: int) -> None:
    spec = SCRIPTS[name]
    args = ["--lr", repr(spec.lr * factor), "--seed", "0", "--steps", str(spec.fault_steps), "--print-every", "1"]
    pair = run_both(name, args, tmp_path)
    # A diverging run too must be left exactly as python runs it (NaN and all): gradguard only watches.
    assert_same_as_python(pair)

    # The oracle for "when": the plain run's own printed loss, every step.
    losses = printed_losses(pair.plain.stdout)
    blowup = first_blowup(losses)
    assert blowup is not None, f"the fault did not throw the script's loss up:\n{pair.plain.stdout}"
    # The run must go on past the steps a diagnosis may name, or a late one could not be told from none.
    assert losses[-1][0] >= blowup + NEAR, f"fault run too short for a blow-up at step {blowup}"

    found = sorted((d for d in diagnoses(pair.run_dir) if d.get("kind") in FAULT_KINDS), key=lambda d: d["step"])
    assert found, f"{name} at lr x{factor}: no exploding/nonfinite diagnosis; loss blew up at step {blowup}\n" \
                  f"{describe(pair)}"
    first = found[0]
    assert first["step"] <= blowup + NEAR, (
        f"{name} at lr x{factor}: first diagnosis {first['kind']} at step {first['step']}, but the script's loss "
        f"blew up at step {blowup}\n{describe(pair)}")
