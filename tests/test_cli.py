"""The command line: the demo end to end (each story, the final table, the reports) and version/usage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gradguard.cli import _split_run_argv, main


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "gradguard", "demo", "all", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # matplotlib's and NumPy's warnings stay off the console
    return proc.stdout, out


def row(text: str, run: str) -> str:
    return next(line for line in text.splitlines() if f"│ {run} " in line)


def test_vanishing_story_and_its_fixes(demo: tuple[str, Path]) -> None:
    text, out = demo
    assert "vanishing (step" in row(text, "sigmoid MLP, 10 layers") and "10." in row(text, "sigmoid MLP, 10 layers")
    assert "none (healthy)" in row(text, "ReLU + Kaiming, 10 layers")
    assert "vanishing" in row(text, "tanh RNN, T=100") and "0.16" in row(text, "tanh RNN, T=100")
    lstm_mse = float(row(text, "LSTM, T=100").split("guessing)")[1].split()[0])
    assert lstm_mse < 0.05  # the LSTM carries the start of the sequence to the end
    assert "through time in 'rnn'" in text
    # Two runs vanish in a layer named 'rnn': each live block says which run it is, and its advice fits its layer.
    rnn = text[text.index("[gradguard: tanh RNN, T=100] step"):text.index("[gradguard: LSTM, T=100] step")]
    assert "fix: use a gated recurrent layer (nn.LSTM or nn.GRU) instead of the plain nn.RNN 'rnn'" in rnn
    lstm = text[text.index("[gradguard: LSTM, T=100] step"):text.index("== exploding")]
    assert "fix: 'rnn' is an LSTM already: set its forget-gate bias to 1" in lstm and "plain" not in lstm
    assert (out / "vanishing" / "sigmoid-mlp-10-layers" / "report.html").exists()


def test_exploding_story_and_its_fixes(demo: tuple[str, Path]) -> None:
    text, _ = demo
    assert "exploding (step" in row(text, "lr 1.0") and "nonfinite (step" in row(text, "lr 1.0")
    sick = text[text.index("== exploding"):]
    assert sick.index("error: exploding") < sick.index("error: nonfinite")  # warned before the NaN
    assert "none (healthy)" in row(text, "lr 0.1")
    repaired = row(text, "lr 1.0, repair='auto'")
    # the table is printed 220 wide: one line per run; the ladder lowered the rate, by a backoff or a rollback
    assert "repaired: " in repaired and ("lr_backoff" in repaired or "rollback" in repaired)
    assert float(repaired.split("test accuracy")[1].split("%")[0]) > 90.0  # the ladder saved the run
    assert float(row(text, "lr 1.0, clip norm 1").split("test accuracy")[1].split("%")[0]) < 50.0


def test_modes_story_shows_the_mistakes_and_the_fix(demo: tuple[str, Path]) -> None:
    text, _ = demo
    wrong, right = text.split("== 2. gradguard.inference(model) ==")
    wrong = wrong[wrong.index("== 1. torch.no_grad()"):]
    assert "error: train_mode_inference in '1', '3'" in wrong and "error: inference_mutates_state in '1'" in wrong
    assert "a batch of one fails in training mode" in wrong
    assert "three calls identical: True; equal to model.eval() + torch.no_grad(): True" in right
    # The correct way raises nothing: the only gradguard line after it is the Guard's summary at close, which counts
    # the two diagnoses of part 1.
    said = [line for line in right.splitlines() if line.startswith("[gradguard")]
    assert len(said) == 1 and said[0].startswith("[gradguard] summary: 2 diagnoses: train_mode_inference (step "), said
    assert "x less without autograd's saved activations" in right


def test_version_and_usage(capsys) -> None:
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert "gradguard 0.1.0" in capsys.readouterr().out


def test_run_without_a_script_says_what_to_do(capsys) -> None:
    for argv in (["run"], ["run", "--out", "somewhere", "--repair"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2
        assert ("usage: gradguard run [-h] [--out DIR] [--log-every N] [--repair] [--stochastic NAME] SCRIPT "
                "[ARGS...]") in err
        assert "no script given" in err and "required" not in err


def test_run_on_a_directory_or_a_missing_script(tmp_path: Path, capsys) -> None:
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "train.py").write_text("")
    assert main(["run", "--out", str(tmp_path / "r"), str(tmp_path / "proj")]) == 2
    err = capsys.readouterr().err
    assert "is a directory, not a script, and has no __main__.py" in err and "proj/train.py" in err
    assert main(["run", "--out", str(tmp_path / "r"), str(tmp_path / "nope.py")]) == 2
    assert "no such script" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was run, so no run directory either


def test_run_rejects_a_log_every_below_one(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", "--log-every", "0", "train.py"])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "own", "script_args"), [
    (["run", "t.py", "--out", "x", "-h"], ["run", "t.py"], ["--out", "x", "-h"]),
    (["run", "--out", "o", "--repair", "t.py", "--", "a"], ["run", "--out", "o", "--repair", "t.py"], ["--", "a"]),
    (["run", "--out=o", "--log-every", "5", "t.py"], ["run", "--out=o", "--log-every", "5", "t.py"], []),
    (["run", "--", "-t.py", "-x"], ["run", "--", "-t.py"], ["-x"]),
    (["run", "--out", "o"], ["run", "--out", "o"], []),
])
def test_the_scripts_arguments_are_passed_on_verbatim(argv: list[str], own: list[str], script_args: list[str]) -> None:
    # The oracle: python puts every word after the script name, '--' included, into the script's sys.argv[1:].
    assert _split_run_argv(argv) == (own, script_args)
