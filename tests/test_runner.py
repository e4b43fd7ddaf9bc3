"""gradguard run on unmodified scripts: arguments, output, exit codes and diagnoses preserved end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "train_digits.py"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gradguard", "run", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_script_runs_as_itself_and_is_watched(tmp_path) -> None:
    out = run("--out", str(tmp_path / "r"), "--log-every", "5", str(FIXTURE), "--steps", "150", "--exit", "3")
    assert out.returncode == 3, out.stderr  # sys.exit(3) in the script
    assert "argv=['--steps', '150', '--exit', '3'] name=__main__" in out.stdout
    events = [json.loads(x) for x in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events] == ["vanishing"] and events[0]["layers"][0] in ("0", "2")
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["model"] == "Sequential" and meta["optimizer"] == "SGD" and meta["options"]["log_every"] == 5
    assert "step 99 warning: vanishing" in out.stderr
    assert "watched Sequential + SGD; 1 diagnosis: vanishing;" in out.stderr


def test_crash_shows_the_traceback_as_python_would(tmp_path) -> None:
    out = run("--out", str(tmp_path / "r"), str(FIXTURE), "--crash")
    plain = subprocess.run([sys.executable, str(FIXTURE), "--crash"], capture_output=True, text=True, timeout=300)
    assert out.returncode == plain.returncode == 1
    tail = "\n".join(plain.stderr.strip().splitlines()[-3:])  # the script's own frame and the error
    assert tail in out.stderr
    assert (tmp_path / "r" / "stats.jsonl").read_text()  # logs flushed before exiting
    # After the traceback, one line of gradguard's: what it watched and found (events.jsonl has the same count).
    found = len((tmp_path / "r" / "events.jsonl").read_text().splitlines())
    said = "no diagnosis" if found == 0 else f"{found} diagnos{'is' if found == 1 else 'es'}"
    assert out.stderr.strip().splitlines()[-1].startswith(f"[gradguard] watched Sequential + SGD; {said}")


def test_command_errors(tmp_path) -> None:
    missing = run(str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "no such script" in missing.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    unwritable = run("--out", str(blocker / "sub"), str(FIXTURE))
    assert unwritable.returncode == 2 and "cannot write the run directory" in unwritable.stderr


def test_default_run_directory(tmp_path) -> None:
    script = tmp_path / "tiny.py"
    script.write_text(
        "import torch\nm = torch.nn.Linear(3, 1)\nopt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "for _ in range(3):\n    opt.zero_grad(); m(torch.randn(4, 3)).sum().backward(); opt.step()\n")
    out = run(str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "gradguard-runs").iterdir()
    assert run_dir.name.startswith("tiny-") and (run_dir / "meta.json").exists()


def test_two_models_two_optimizers_each_watched(tmp_path) -> None:
    script = tmp_path / "gan.py"
    script.write_text(
        "import torch\nfrom torch import nn\n"
        "class G(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))\n"
        "    def forward(self, z):\n        return self.body(z)\n"
        "g, d = G(), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))\n"
        "og, od = torch.optim.Adam(g.parameters()), torch.optim.SGD(d.parameters(), lr=0.01)\n"
        "for _ in range(12):\n"
        "    od.zero_grad(); d(g(torch.randn(8, 4)).detach()).mean().backward(); od.step()\n"
        "    og.zero_grad(); (-d(g(torch.randn(8, 4)))).mean().backward(); og.step()\n")
    out = run("--out", str(tmp_path / "r"), str(script))
    assert out.returncode == 0, out.stderr
    first = json.loads((tmp_path / "r" / "meta.json").read_text())
    second = json.loads((tmp_path / "r" / "optimizer-1" / "meta.json").read_text())
    assert (first["model"], first["optimizer"]) == ("Sequential", "SGD")  # the discriminator steps first
    assert (second["model"], second["optimizer"]) == ("G", "Adam")
    assert [lay["name"] for lay in second["layers"]] == ["body.0", "body.2"]  # named from the model's root


def test_repair_flag_turns_the_ladder_on(tmp_path) -> None:
    script = tmp_path / "hot.py"
    script.write_text(
        "import torch\nfrom torch import nn\ntorch.manual_seed(0)\n"
        "m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "for i in range(20):\n"
        "    opt.zero_grad()\n"
        "    loss = m(torch.randn(8, 4)).square().mean() * (float('nan') if i == 7 else 1.0)\n"
        "    loss.backward(); opt.step()\n"
        "print('finite', all(torch.isfinite(p).all().item() for p in m.parameters()))\n")
    out = run("--repair", "--out", str(tmp_path / "r"), str(script))
    assert out.returncode == 0, out.stderr
    assert "finite True" in out.stdout  # the NaN step was skipped, not applied
    events = [json.loads(x) for x in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    assert {"type": "action", "kind": "skip_step", "step": 7} in [
        {k: e[k] for k in ("type", "kind", "step")} for e in events]
    skips = sum(1 for e in events if e.get("type") == "action" and e["kind"] == "skip_step")
    last = out.stderr.splitlines()[-1]  # the last line counts what was done
    assert "actions: " in last and f"{skips} skip_step" in last.split("actions: ")[1]


ACCUM = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(4 * 6)]
for step in range(6):
    opt.zero_grad()
    total = 0.0
    for x, y in data[4 * step: 4 * step + 4]:
        loss = nn.functional.mse_loss(model(x), y) / 4  # accumulation over 4 micro-batches
        total += loss.item()
        loss.backward()
    opt.step()
    print(f"step {step} loss {total!r}")
"""


def test_accumulated_step_losses_are_the_scripts_own(tmp_path) -> None:
    # The step's loss is the sum of its backward roots (the mean micro-batch loss here), step 0 included, whose
    # backwards ran before the runner attached the Guard at the first optimizer step.
    script = tmp_path / "accum.py"
    script.write_text(ACCUM)
    out = run("--out", str(tmp_path / "r"), "--log-every", "1", str(script))
    assert out.returncode == 0, out.stderr
    want = [float(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("step ")]
    got = [json.loads(x)["loss"] for x in (tmp_path / "r" / "stats.jsonl").read_text().splitlines()]
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "stats.jsonl").read_text().splitlines()]
    assert len(want) == 6 and steps == list(range(6))
    for s, loss in zip(steps, got):
        assert abs(loss - want[s]) < 1e-5 * abs(want[s]), (s, loss, want[s])


BY_HAND = """
import torch
from torch import nn
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
for i in range(30):
    m.zero_grad()
    x = torch.randn(16, 4)
    loss = (m(x) - x.sum(1, keepdim=True)).square().mean()
    loss.backward()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(p.grad, alpha=-float(LR))  # hand-written SGD: no torch.optim optimizer
print('done', loss.item())
"""


def test_repair_on_a_loop_without_an_optimizer_says_once_that_it_cannot_act(tmp_path) -> None:
    script = tmp_path / "by_hand.py"
    script.write_text(BY_HAND.replace("LR", "0.5"))  # far too high: it diverges, as --repair is meant for
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    out = run("--repair", "--out", str(tmp_path / "r"), str(script))
    assert out.returncode == plain.returncode == 0 and out.stdout == plain.stdout, out.stderr
    said = [line for line in out.stderr.splitlines() if "--repair needs a torch.optim optimizer" in line]
    assert len(said) == 1 and said[0].startswith("[gradguard] "), out.stderr
    events = [json.loads(x) for x in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    notes = [e for e in events if e.get("type") == "note"]
    assert [(e["kind"], e["step"]) for e in notes] == [("repair_unavailable", 0)]
    assert notes[0]["message"] in said[0]
    assert not [e for e in events if e.get("type") == "action"]  # nothing was repaired, and nothing claims it
    diagnosed = [e for e in events if e.get("type") == "diagnosis"]
    assert diagnosed, out.stderr  # it is still watched: the divergence is diagnosed
    assert not [r for e in diagnosed for r in e["remedies"] if "repair='auto'" in r]  # not offered: cannot act
    # Without --repair nothing is said about it.
    quiet = run("--out", str(tmp_path / "q"), str(script))
    assert "--repair" not in quiet.stderr
    assert not [e for e in (json.loads(x) for x in (tmp_path / "q" / "events.jsonl").read_text().splitlines())
                if e.get("type") == "note"]
    # The report reads the note without complaint, and says what was and was not judged: units at the sampled
    # steps, update sizes not at all (no optimizer; every update_ratio in stats.jsonl is null).
    from gradguard.report.load import load_run
    from gradguard.report.words import verdict

    loaded = load_run(tmp_path / "r")
    assert not loaded.notes, loaded.notes
    findings = " ".join(verdict(loaded)[1])
    assert "Update sizes: not measured (no optimizer" in findings and "Update sizes, dead" not in findings
    assert notes[0]["message"] in findings


VAE_LIKE = (
    "import torch\nfrom torch import nn\ntorch.manual_seed(0)\n"
    "class VAE(nn.Module):  # samples in eval too, as pytorch/examples' VAE does: the test loss is an ELBO estimate\n"
    "    def __init__(self):\n"
    "        super().__init__(); self.enc = nn.Linear(6, 4); self.dec = nn.Linear(2, 6)\n"
    "    def forward(self, x):\n"
    "        mu, logvar = self.enc(x).chunk(2, dim=1)\n"
    "        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()\n"
    "        return self.dec(z)\n"
    "m = VAE(); opt = torch.optim.Adam(m.parameters(), lr=1e-3); x = torch.randn(32, 6)\n"
    "for epoch in range(3):\n"
    "    m.train()\n"
    "    for _ in range(10):\n"
    "        opt.zero_grad(); loss = (m(x) - x).square().mean(); loss.backward(); opt.step()\n"
    "    m.eval()\n"
    "    with torch.no_grad():\n"
    "        print('test loss', round((m(x) - x).square().mean().item(), 4))\n")


def test_a_sampler_in_eval_is_a_warning_and_can_be_marked_from_the_command_line(tmp_path) -> None:
    """A VAE's reparameterisation samples in eval mode by design: gradguard says so as a warning that names the
    function that drew (not a dropout left on, the error), and ``--stochastic '(root)'`` marks it."""
    script = tmp_path / "vae.py"
    script.write_text(VAE_LIKE)
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    told = run("--out", str(tmp_path / "told"), str(script))
    marked = run("--stochastic", "(root)", "--out", str(tmp_path / "marked"), str(script))
    assert plain.returncode == told.returncode == marked.returncode == 0, told.stderr + marked.stderr
    assert told.stdout == marked.stdout == plain.stdout  # the script's numbers: sampled alike in all three
    (d,) = [json.loads(x) for x in (tmp_path / "told" / "events.jsonl").read_text().splitlines()]
    assert d["kind"] == "stochastic_inference" and d["severity"] == "warning"
    assert d["layers"] == ["VAE (the model itself)"] and "(randn_like)" in d["message"]
    assert any("--stochastic '(root)'" in r for r in d["remedies"])
    assert (tmp_path / "marked" / "events.jsonl").read_text() == ""
    bad = run("--stochastic", "decoder", "--out", str(tmp_path / "bad"), str(script))
    assert bad.returncode == 0 and "--stochastic 'decoder': VAE has no such module" in bad.stderr
