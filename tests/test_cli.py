import subprocess
import sys

from gradguard.cli import main


def test_demo_prints_each_story() -> None:
    out = subprocess.run([sys.executable, "-m", "gradguard", "demo", "gradients"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    sections = text.split("== ")[1:]
    assert len(sections) == 3
    assert "vanishing" in sections[0] and "diagnoses: vanishing" in sections[0]
    assert "diagnoses: none: healthy" in sections[1] and "[gradguard]" not in sections[1]
    assert "diagnoses: exploding, nonfinite" in sections[2]
    assert text.index("error: exploding") < text.index("error: nonfinite")


def test_modes_demo_shows_the_mistakes_and_the_fix() -> None:
    out = subprocess.run([sys.executable, "-m", "gradguard", "demo", "modes"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    wrong, right = text.split("== 2. gradguard.inference(model) ==")
    assert "error: train_mode_inference in '1', '3'" in wrong and "error: inference_mutates_state in '1'" in wrong
    assert "a batch of one fails in training mode" in wrong
    assert "three calls identical: True; equal to model.eval() + torch.no_grad(): True" in right
    assert "[gradguard]" not in right  # the correct way raises nothing
    assert "x less without autograd's saved activations" in right


def test_version_and_usage(capsys) -> None:
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert "gradguard 0.1.0" in capsys.readouterr().out
