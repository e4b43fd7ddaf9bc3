"""What the report shows a reader: actions as stretches in words, the clip threshold over the pre-clip norm,
non-finite values marked, lone points drawn, every listed step in the gradient-flow plot, labelled update-ratio
lines, and a verdict that says what could not be judged. Plots are checked on the matplotlib objects drawn."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from gradguard.report.html import render
from gradguard.report.load import clip_threshold, load_run, update_samples
from gradguard.report.plots import draw, flow_picks
from gradguard.report.plotting import quiet_matplotlib
from gradguard.report.words import verdict

pytest.importorskip("matplotlib")


def write(d: Path, stats: list[dict[str, Any]], events: list[dict[str, Any]], layers: list[str] | None = None,
          **thresholds: Any) -> Path:
    d.mkdir(parents=True)
    names = layers if layers is not None else ["enc", "dec"]
    meta = {"schema": 1, "model": "Net", "optimizer": "SGD", "layers": [{"name": n, "numel": 1} for n in names],
            "options": {"sample_every": 25, "thresholds": {"warmup": 50, "window": 100, **thresholds}}}
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stats))
    (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return d


def row(step: int, total: Any = 1.0, loss: Any = 1.0, grad: dict[str, Any] | None = None, **extra: Any) -> dict:
    return {"step": step, "loss": loss, "total_grad_norm": total, "total_grad_norm_max": total,
            "grad_norm": grad if grad is not None else {"enc": 0.6, "dec": 0.8}, **extra}


def action(kind: str, step: int, **detail: Any) -> dict[str, Any]:
    return {"type": "action", "kind": kind, "step": step, "detail": detail}


def lines(fig: Any) -> dict[str, Any]:
    """The labelled lines of a figure's first axes, by label."""
    return {ln.get_label(): ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")}


def legend_texts(fig: Any) -> list[str]:
    legends = list(fig.legends) + [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    return [t.get_text() for lg in legends for t in lg.get_texts()]


def test_actions_are_stretches_in_words_with_a_count(tmp_path: Path) -> None:
    events = ([action("clip", s, method="global_norm", norm=2.0 + s, clipped_norm=1.0) for s in range(10)]
              + [action("freeze", 5, layer_count=2)]
              + [action("skip_step", s, why="non-finite gradients") for s in range(11, 215)]
              + [action("lr_backoff", 20, lr_multiplier=0.5, was=1.0, why="sustained explosion"),
                 action("rollback", 230, to_step=100, lr_multiplier=0.125, rollbacks=3,
                        stopped="3 rollbacks did not stabilise training."),
                 action("skip_step", 300, why="non-finite gradients", fused=True),
                 action("lr_restore", 400, lr_multiplier=1.0, was=0.5)])
    run = load_run(write(tmp_path / "run", [row(s) for s in range(401)], events))
    page = render(run)
    section = page[page.index("<h2>What gradguard did</h2>"):page.index("<h2>Gradient norm</h2>")]
    assert ("<p>10 steps clipped, 1 freeze, 205 steps skipped, 1 learning-rate backoff, 1 rollback, "
            "1 learning-rate restore.</p>") in section
    items = [x.split("</li>")[0] for x in section.split("<li>")[1:]]
    assert items == [
        "clipped 10 steps, 0\u20139 (global norm): gradient norm 2\u201311 cut to 1",
        "freeze at step 5: layer count: 2",
        "skipped 204 steps, 11\u2013214: non-finite gradients",
        "lowered the learning rate to 0.5x the script&#x27;s (was 1x) at step 20: sustained "
        "explosion",
        "rolled back at step 230 to the weights and optimizer state of step 100; learning rate now 0.125x the "
        "script&#x27;s (rollback 3). 3 rollbacks did not stabilise training.",
        "skipped step 300: non-finite gradients (a fused optimizer: skipped on the device)",
        "raised the learning rate back to 1x the script&#x27;s (was 0.5x) at step 400"]
    assert "{" not in section  # no raw dicts
    _, findings, _ = verdict(run)
    assert ("gradguard acted: 10 steps clipped, 1 freeze, 205 steps skipped, 1 learning-rate backoff, 1 rollback, "
            "1 learning-rate restore (below).") in findings


def test_the_pre_clip_norm_is_drawn_under_the_clip_threshold(tmp_path: Path) -> None:
    totals = [2.0 + s for s in range(10)]
    fixed = write(tmp_path / "fixed", [row(s, total=t) for s, t in enumerate(totals)],
                  [action("clip", s, method="global_norm", norm=t, clipped_norm=1.0) for s, t in enumerate(totals)])
    run = load_run(fixed)
    assert clip_threshold(run) == (1.0, [(s, 1.0) for s in range(10)])
    assert "<dt>clipping</dt><dd>at norm 1</dd>" in render(run)
    with quiet_matplotlib():
        drawn = lines(draw(run)["norm"])
    assert list(drawn["gradient norm before clipping"].get_ydata()) == totals
    assert list(drawn["clip threshold 1 (10 steps clipped)"].get_ydata()) == [1.0, 1.0]  # a horizontal line

    adaptive = write(tmp_path / "adaptive", [row(s, total=t) for s, t in enumerate(totals)],
                     [action("clip", s, method="zclip", norm=t, clipped_norm=1.0 + s / 10) for s, t in
                      enumerate(totals)])
    run = load_run(adaptive)
    assert clip_threshold(run)[0] is None
    with quiet_matplotlib():
        drawn = lines(draw(run)["norm"])
    threshold = drawn["clip threshold at each clipped step (10 steps)"]
    assert list(threshold.get_xdata()) == list(range(10))
    assert list(threshold.get_ydata()) == pytest.approx([1.0 + s / 10 for s in range(10)])
    assert "<dt>clipping</dt>" not in render(run)


def test_nonfinite_values_are_marked_from_their_first_step(tmp_path: Path) -> None:
    stats = [row(s) for s in range(30)] + [row(s, total="inf", loss="nan", grad={"enc": "nan", "dec": "inf"})
                                           for s in range(30, 60)]
    run = load_run(write(tmp_path / "run", stats, []))
    with quiet_matplotlib():
        figs = draw(run)
        norm = lines(figs["norm"])
        marks = norm["gradient norm: NaN or Inf"]
        assert list(marks.get_xdata()) == list(range(30, 60))
        total = norm["total gradient norm"].get_ydata()
        assert all(math.isnan(v) for v in total[30:])  # a gap under the marks, never a line up to a huge value
        texts = [t.get_text() for t in figs["norm"].axes[0].texts]
        assert texts == ["gradient norm non-finite from step 30"]
        assert [t.get_text() for t in figs["loss"].axes[0].texts] == ["loss non-finite from step 30"]
        assert "non-finite (NaN/Inf), first at step 30" in legend_texts(figs["heatmap"])
        # Every step the flow legend lists is drawn: finite steps as dots, non-finite ones as edge marks.
        assert flow_picks(run) == [0, 29, 30, 59]
        assert legend_texts(figs["flow"]) == ["step 0", "step 29", "step 30 (2 non-finite)",
                                              "step 59 (2 non-finite)"]


def test_a_lone_point_has_a_marker(tmp_path: Path) -> None:
    # Statistics at step 50 only between two unobserved steps: a line through it would have no length.
    stats = [row(s, total=None if s in (49, 51) else 1.0) for s in range(100)]
    run = load_run(write(tmp_path / "run", stats, []))
    with quiet_matplotlib():
        ax = draw(run)["norm"].axes[0]
    lone = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [50]]
    assert len(lone) == 1 and lone[0].get_marker() == "o"
    short = load_run(write(tmp_path / "short", [row(0), row(1, total=None), row(2)], []))
    with quiet_matplotlib():
        assert lines(draw(short)["norm"])["total gradient norm"].get_marker() == "o"  # few points: all marked


def test_gradient_flow_is_dots_on_a_log_axis_only_over_decades(tmp_path: Path) -> None:
    layers = [f"l{i}" for i in range(9)]
    vanishing = [row(s, grad={n: 10.0 ** -(8 - i) for i, n in enumerate(layers)}) for s in range(3)]
    run = load_run(write(tmp_path / "deep", vanishing, [], layers=layers))
    with quiet_matplotlib():
        fig = draw(run)["flow"]
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.patches) == 0  # dots, not bars from an arbitrary base
    assert [t.get_text() for t in ax.get_yticklabels()] == layers  # first layer at the top
    for ln in lines(fig).values():
        assert list(ln.get_xdata()) == pytest.approx([10.0 ** -(8 - i) for i in range(9)])
    narrow = load_run(write(tmp_path / "narrow", [row(s) for s in range(3)], []))
    with quiet_matplotlib():
        assert draw(narrow)["flow"].axes[0].get_xscale() == "linear"  # 0.6 and 0.8: a log axis says nothing


def test_update_ratios_name_the_layers_farthest_from_healthy(tmp_path: Path) -> None:
    layers = [f"layer{i}" for i in range(12)]
    ratios = {n: 1e-3 * 10.0 ** (i - 6) for i, n in enumerate(layers)}  # 1e-9 ... 1e2: decades from 1e-3 = |i - 6|
    ratios["layer6"] = 0.0  # a frozen layer: the weights never moved
    stats = [row(s, sample_step=0, update_ratio=ratios) for s in range(3)]  # one sample, repeated on every line
    run = load_run(write(tmp_path / "run", stats, [], layers=layers))
    assert update_samples(run) == [(0, ratios)]
    with quiet_matplotlib():
        fig = draw(run)["update"]
    # 8 named: frozen first, then by decades from 1e-3 (ties in layer order); the rest summed up in grey.
    assert legend_texts(fig) == ["layer6", "layer0", "layer1", "layer11", "layer2", "layer10", "layer3", "layer9",
                                 "4 other layers (closer to 1e-3)", "1e-3: typical of healthy training",
                                 "0: some layer's weights did not change"]
    drawn = lines(fig)
    colours = {drawn[n].get_color() for n in ["layer0", "layer11", "layer1", "layer10", "layer2", "layer9",
                                              "layer3"]}
    assert len(colours) == 7  # distinct
    assert list(drawn["layer0"].get_xdata()) == [0] and drawn["layer0"].get_marker() == "o"  # one sample: a dot


def test_grey_heatmap_cells_are_explained(tmp_path: Path) -> None:
    stats = [row(s, grad={"enc": None, "dec": 0.8}) for s in range(5)]
    run = load_run(write(tmp_path / "run", stats, []))
    with quiet_matplotlib():
        assert legend_texts(draw(run)["heatmap"]) == ["no gradient (unused layer, or exactly zero)"]
    assert "Grey cells: the layer had no gradient" in render(run)


def test_the_verdict_says_healthy_only_after_a_full_window(tmp_path: Path) -> None:
    full = load_run(write(tmp_path / "full", [row(s, loss=2.0 - s / 200) for s in range(120)], []))
    head, findings, css = verdict(full)
    assert (head, css) == ("No diagnoses: healthy as far as the gradients show", "ok")
    assert findings == ["120 steps recorded, in 120 statistics lines.", "Gradients: finite at every logged step.",
                        "Exploding and vanishing gradients: judged over 120 steps.",
                        "Loss: from 1.98 at the start (median of steps 0\u20139) to 1.41 at step 119.",
                        "Update sizes, dead and saturated units: not judged, no step was sampled (one every 25 "
                        "steps)."]
    # A lucky first batch (loss 0.2) does not make a flat loss read as rising: the start is a median.
    lucky = load_run(write(tmp_path / "lucky", [row(0, loss=0.2)] + [row(s, loss=1.0) for s in range(1, 120)], []))
    assert "Loss: from 1 at the start (median of steps 0\u20139) to 1 at step 119." in verdict(lucky)[1]
    assert verdict(lucky)[0] == "No diagnoses: healthy as far as the gradients show"
    unobserved = load_run(write(tmp_path / "noloss", [row(s, loss=None) for s in range(120)], []))
    assert ("Loss: not observed, so whether training made progress could not be judged (call "
            "guard.observe_loss(loss); gradguard run observes the loss that backward() is called on).") in \
        verdict(unobserved)[1]
    diag = {"type": "diagnosis", "kind": "vanishing", "step": 99, "severity": "warning", "layers": ["enc"],
            "message": "m", "evidence": {}, "remedies": []}
    sick = load_run(write(tmp_path / "sick", [row(s) for s in range(120)], [diag, dict(diag, step=110)]))
    assert verdict(sick)[0::2] == ("Problems found: vanishing (first at step 99, 2 times)", "warning")


def diagnosis(kind: str, step: int, layers: list[str], message: str, remedies: list[str],
              severity: str = "error", **evidence: Any) -> dict[str, Any]:
    return {"type": "diagnosis", "kind": kind, "step": step, "severity": severity, "layers": layers,
            "message": message, "evidence": evidence, "remedies": remedies}


def test_the_verdict_leads_with_when_what_where_and_what_to_do(tmp_path: Path) -> None:
    events = [diagnosis("exploding", 3, ["0", "2"], "Training diverges: loss 24 to 695. The rate is too high.",
                        ["lower the learning rate about 10x", "clip"]),
              diagnosis("exploding", 4, ["2"], "Again.", ["x"]),
              diagnosis("nonfinite", 6, [], "Non-finite values at step 6: the loss is <b>inf</b>.", [])]
    page = render(load_run(write(tmp_path / "run", [row(s) for s in range(10)], events)))
    box = page[page.index("<ol class=leads>"):page.index("<p class=judged>")]
    assert [x.split("</li>")[0] for x in box.split("<li>")[1:]] == [
        "<b class=error>step 3: exploding</b> in <b>0, 2</b>. Training diverges: loss 24 to 695.<br>"
        "<span class=todo>What to do: lower the learning rate about 10x</span>",  # one line per kind, its first
        "<b class=error>step 6: nonfinite</b>. Non-finite values at step 6: the loss is &lt;b&gt;inf&lt;/b&gt;."]
    healthy = render(load_run(write(tmp_path / "healthy", [row(s) for s in range(10)], [])))
    assert "<ol class=leads>" not in healthy and "What was judged" not in healthy


def test_a_blow_up_between_two_logged_steps_is_drawn_from_what_the_diagnoses_reported(tmp_path: Path) -> None:
    # The first statistics line is already non-finite (the run blew up within its first read): without the
    # diagnoses' numbers the norm and loss plots would show nothing finite at all.
    stats = [row(s, total="nan", loss="inf", grad={"enc": "nan", "dec": "nan"}) for s in range(6, 40)]
    events = [diagnosis("exploding", 3, ["enc"], "m", [], grad_norm=996.0, loss=2220.0, first_grad_norm=10.5),
              diagnosis("exploding", 4, ["enc"], "m", [], total_grad_norm=5.2e6, loss=1.78e8),
              diagnosis("nonfinite", 6, [], "m", [], total_grad_norm="nan", loss="inf"),  # logged: not repeated
              diagnosis("vanishing", 5, ["enc"], "m", [], total_grad_norm=1e-9)]  # a window median: not a step's
    run = load_run(write(tmp_path / "run", stats, events))
    name = "between logged steps, as a diagnosis reported it"
    with quiet_matplotlib():
        figs = draw(run)
        for key, values in (("norm", [996.0, 5.2e6]), ("loss", [2220.0, 1.78e8])):
            ax = figs[key].axes[0]
            drawn = lines(figs[key])[name]
            assert list(drawn.get_xdata()) == [3, 4] and list(drawn.get_ydata()) == values
            assert ax.get_yscale() == "log" and ax.get_xlim()[0] < 3
    assert "hollow \u25c7: the value a diagnosis reported" in render(run)


def test_a_loss_never_finite_says_so_instead_of_an_axis_of_made_up_numbers(tmp_path: Path) -> None:
    run = load_run(write(tmp_path / "run", [row(s, loss="nan") for s in range(20)], []))
    with quiet_matplotlib():
        ax = draw(run)["loss"].axes[0]
    assert "no finite loss value was logged" in [t.get_text() for t in ax.texts]
    assert list(ax.get_yticks()) == []


def test_clips_a_few_steps_apart_are_one_stretch(tmp_path: Path) -> None:
    events = ([action("clip", s, method="global_norm", norm=2.0, clipped_norm=1.0) for s in range(0, 21, 2)]
              + [action("clip", 40, method="global_norm", norm=3.0, clipped_norm=1.0)])
    page = render(load_run(write(tmp_path / "run", [row(s) for s in range(50)], events)))
    section = page[page.index("<h2>What gradguard did</h2>"):page.index("<h2>Gradient norm</h2>")]
    assert [x.split("</li>")[0] for x in section.split("<li>")[1:]] == [
        "clipped 11 of the 21 steps 0\u201320 (global norm): gradient norm 2 cut to 1",  # gaps of 2: one stretch
        "clipped step 40 (global norm): gradient norm 3 cut to 1"]  # 20 steps later: another
