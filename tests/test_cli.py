import subprocess
import sys

from gradguard.cli import main


def test_demo_prints_each_story() -> None:
    out = subprocess.run([sys.executable, "-m", "gradguard", "demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    sections = text.split("== ")[1:]
    assert len(sections) == 3
    assert "vanishing" in sections[0] and "diagnoses: vanishing" in sections[0]
    assert "diagnoses: none: healthy" in sections[1] and "[gradguard]" not in sections[1]
    assert "diagnoses: exploding, nonfinite" in sections[2]
    assert text.index("error: exploding") < text.index("error: nonfinite")


def test_version_and_usage(capsys) -> None:
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert "gradguard 0.1.0" in capsys.readouterr().out
