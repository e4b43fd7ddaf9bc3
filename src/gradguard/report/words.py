"""What the report says in words: numbers as a reader reads them, repair actions as stretches of steps, and the
verdict, which says what the run shows, what was judged and what could not be.

"Healthy" is said only when there was enough to judge: no diagnosis after too few steps is "too few steps to
judge", and no diagnosis above a loss that rose is "the run is not healthy".

Room: the outputs. It may touch: ``report``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from .load import Run, first_nonfinite, update_samples
from .records import number, plural


def fmt(x: Any) -> str:
    """A value for a reader: numbers with 3 significant digits, "nan"/"inf" strings kept, the rest as JSON."""
    if isinstance(x, bool) or x is None:
        return json.dumps(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "NaN" if math.isnan(x) else ("Inf" if x > 0 else "-Inf")
        if 1e3 <= abs(x) < 1e6:  # 3,400 rather than 3.4e+03
            return f"{x:,.0f}"
        return f"{x:.3g}"
    if isinstance(x, str):
        return x
    try:
        return json.dumps(x, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(x)


def times(ratio: float) -> str:
    """A ratio as a reader says it: 1,700x, 3.2x."""
    if ratio >= 1e5:  # 3,743,311,502,457,893,289,984x is not read, 3.7e+21x is
        return f"{ratio:.2g}x"
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def as_text(x: Any) -> str:
    """A descriptive meta.json field (model, optimizer, ...) as text."""
    return "unknown" if x is None else fmt(x)


def _steps_text(first: int, last: int, count: int) -> str:
    """Where a stretch of actions happened: "step 7", "204 steps, 11\u2013214", or "103 of the 162 steps
    8\u2013169" when it has gaps."""
    if first == last:
        return f"step {first}"
    span = last - first + 1
    return f"{count:,} steps, {first}\u2013{last}" if count == span else \
        f"{count:,} of the {span:,} steps {first}\u2013{last}"


# ---------------------------------------------------------------------------------------------------- actions


def _words(detail: dict[str, Any], skip: Sequence[str] = ()) -> str:
    """The fields of an action's detail as words, not a raw dict: ``lr multiplier: 0.5; why: ...``."""
    return "; ".join(f"{str(k).replace('_', ' ')}: {fmt(v)}" for k, v in detail.items() if k not in skip)


def _lr(x: Any, whose: str = " the script's") -> str:
    """A learning-rate multiplier: "0.5x the script's" (the ladder scales the script's own learning rate)."""
    value, ok = number(x)
    return f"{fmt(value)}x{whose}" if ok and value is not None else "?"


def _range(values: list[float]) -> str:
    """The span of some numbers, "5.46\u201317" (one number when they agree), noting any non-finite ones."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return fmt(values[0]) if values else "?"
    lo, hi = min(finite), max(finite)
    text = fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}\u2013{fmt(hi)}"
    return text + (" (and non-finite)" if len(finite) < len(values) else "")


def _numbers(actions: list[dict[str, Any]], key: str) -> list[float]:
    """The numbers under ``detail[key]`` of some actions (values that are not numbers left out)."""
    out = []
    for a in actions:
        value, ok = number(a["detail"].get(key))
        if ok and value is not None:
            out.append(value)
    return out


def stretch_text(kind: str, detail: dict[str, Any], first: int, last: int, count: int,
                 norms: tuple[list[float], list[float]] = ([], [])) -> str:
    """A stretch of skips or clips in words, from what a live console keeps of it (not every action).

    Args:
        kind: "skip_step" or "clip". detail: the first action's detail. first, last: its first and last step.
        count: how many actions it holds. norms: (clips) the norms before and after clipping: any subset of them
            that holds the smallest and largest finite value and, if there was one, a non-finite value.

    Returns:
        "skipped 204 steps, 11–214: non-finite gradients", "clipped step 7 (norm): gradient norm 5.46 cut to 1".
    """
    where = _steps_text(first, last, count)
    if kind == "skip_step":
        why = detail.get("why")
        fused = " (a fused optimizer: skipped on the device)" if detail.get("fused") else ""
        return f"skipped {where}" + (f": {fmt(why)}" if why else "") + fused
    method = str(detail.get("method", "")).replace("_", " ")
    before, after = norms
    cut = f": gradient norm {_range(before)} cut to {_range(after)}" if before and after else ""
    return f"clipped {where}" + (f" ({method})" if method else "") + cut


def describe(kind: str, acts: list[dict[str, Any]]) -> str:
    """One stretch of actions of one kind (consecutive steps) in words."""
    first, last = acts[0]["step"], acts[-1]["step"]
    where = _steps_text(first, last, len(acts))
    d = acts[0]["detail"]
    if kind in GROUPED:
        return stretch_text(kind, d, first, last, len(acts), (_numbers(acts, "norm"), _numbers(acts, "clipped_norm")))
    if kind == "lr_backoff":
        why = f": {fmt(d['why'])}" if d.get("why") else ""
        return (f"lowered the learning rate to {_lr(d.get('lr_multiplier'))} (was {_lr(d.get('was'), '')}) "
                f"at {where}{why}")
    if kind == "lr_restore":
        return (f"raised the learning rate back to {_lr(d.get('lr_multiplier'))} (was {_lr(d.get('was'), '')}) "
                f"at {where}")
    if kind == "rollback":
        text = (f"rolled back at {where} to the weights and optimizer state of step {fmt(d.get('to_step', '?'))}; "
                f"learning rate now {_lr(d.get('lr_multiplier'))}")
        if d.get("rollbacks") is not None:
            text += f" (rollback {fmt(d['rollbacks'])})"
        if d.get("why"):
            text += f": {fmt(d['why'])}"
        return text + (f". {fmt(d['stopped'])}" if d.get("stopped") else "")
    rest = _words(d)
    return f"{kind.replace('_', ' ')} at {where}" + (f": {rest}" if rest else "")


GROUPED = ("skip_step", "clip")  # one per step: shown as stretches. The others are rare and each one matters.
#: Skips or clips this many steps apart or closer form one stretch ("103 of the 162 steps 8\u2013169"): a run that
#: clips most steps of a stretch is one story, not a line per gap.
GAP = 10


def stretch_key(action: dict[str, Any]) -> tuple[str, str]:
    """What skips or clips of one stretch share: their kind, and their reason (skips) or method (clips).

    Args:
        action: an action record (``kind``, ``detail``).

    Returns:
        ``(kind, reason or method)``.
    """
    d = action["detail"]
    return action["kind"], fmt(d.get("why", d.get("method", "")))


def stretches(actions: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Actions as ``(kind, actions)`` stretches in step order: skips and clips (with the same reason or method) at
    most ``GAP`` steps apart form one stretch; every other action is its own."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    out: list[tuple[str, list[dict[str, Any]]]] = []
    for a in sorted(actions, key=lambda a: a["step"]):
        if a["kind"] not in GROUPED:
            out.append((a["kind"], [a]))
            continue
        key = stretch_key(a)
        run = groups.get(key)
        if run is not None and a["step"] - run[-1]["step"] <= GAP:
            run.append(a)
        else:
            run = [a]
            groups[key] = run
            out.append((a["kind"], run))
    return sorted(out, key=lambda kv: kv[1][0]["step"])


def action_counts(actions: list[dict[str, Any]]) -> str:
    """How many of each action, in words: "204 steps skipped, 30 steps clipped, 1 rollback"."""
    counts: dict[str, int] = {}
    for a in sorted(actions, key=lambda a: a["step"]):  # in the order they first happened
        counts[a["kind"]] = counts.get(a["kind"], 0) + 1
    return count_words(counts)


def count_words(counts: dict[str, int]) -> str:
    """Counts of actions by kind in words, in the order given: "204 steps skipped, 1 rollback".

    Args:
        counts: {action kind: how many}.

    Returns:
        The counts joined by commas (empty for no counts).
    """
    names = {"skip_step": ("step skipped", "steps skipped"), "clip": ("step clipped", "steps clipped"),
             "lr_backoff": ("learning-rate backoff", "learning-rate backoffs"),
             "lr_restore": ("learning-rate restore", "learning-rate restores"), "rollback": ("rollback", "rollbacks")}
    parts = []
    for kind, n in counts.items():
        one, many = names.get(kind, (kind.replace("_", " "), kind.replace("_", " ")))
        parts.append(f"{n:,} {one if n == 1 else many}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- verdict


def _threshold(run: Run, key: str, default: int) -> int:
    value = run.thresholds.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def verdict(run: Run) -> tuple[str, list[str], str]:
    """``(headline, findings, css class)``: what the run shows, what was judged and what could not be.

    "Healthy" is said only when there was enough to judge: no diagnosis after too few steps is "too few steps to
    judge", and no diagnosis above a loss that rose is "the run is not healthy".
    """
    steps = [r["step"] for r in run.stats]
    diags = run.diagnoses
    lines: list[str] = []
    if not run.stats:
        head = "No steps recorded"
        lines.append("stats.jsonl holds no statistics: the script never completed an optimizer step while gradguard "
                     "watched (or was stopped before the first line was written). Nothing about gradients could be "
                     "judged.")
        if diags:
            lines.append(f"{plural(len(diags), 'diagnosis', 'diagnoses')} {'was' if len(diags) == 1 else 'were'} "
                         "made outside optimizer steps (listed below).")
        return head, lines, "error" if any(d["severity"] == "error" for d in diags) else "info"

    n_steps = steps[-1] + 1
    warmup, window = _threshold(run, "warmup", 50), _threshold(run, "window", 100)
    rise = run.thresholds.get("loss_rise", 1.5)
    rise = rise if isinstance(rise, (int, float)) and not isinstance(rise, bool) and rise > 1 else 1.5
    unwell = False

    lines.append(f"{plural(n_steps, 'step')} recorded, in {plural(len(steps), 'statistics line')}.")
    total = [r["total_grad_norm"] for r in run.stats]
    bad_grad = first_nonfinite(steps, total)
    if bad_grad is None:
        bad_grad = next((r["step"] for r in run.stats
                         if any(v is not None and not math.isfinite(v) for v in r["grad_norm"].values())), None)
    if bad_grad is not None:
        unwell = True
        count = sum(1 for v in total if v is not None and not math.isfinite(v))
        lines.append(f"Gradients: non-finite (NaN/Inf) from step {bad_grad} ({count:,} of {len(steps):,} lines).")
    elif any(v is not None for v in total):
        lines.append("Gradients: finite at every logged step.")

    if n_steps < warmup:
        lines.append(f"Too few steps to judge trends: the exploding, vanishing and unit rules start after {warmup} "
                     f"steps of warm-up and compare {window}-step windows; this run recorded {n_steps}.")
    elif n_steps < window:
        lines.append(f"Trends judged on part of a window only: the vanishing and growth rules compare {window}-step "
                     f"windows; this run recorded {n_steps} steps.")
    else:
        lines.append(f"Exploding and vanishing gradients: judged over {n_steps:,} steps.")

    observed = [(r["step"], r["loss"]) for r in run.stats if r["loss"] is not None]
    finite = [(s, v) for s, v in observed if math.isfinite(v)]
    if not observed:
        lines.append("Loss: not observed, so whether training made progress could not be judged (call "
                     "guard.observe_loss(loss); gradguard run observes the loss that backward() is called on).")
    else:
        bad_loss = first_nonfinite([s for s, _ in observed], [v for _, v in observed])
        if finite:
            # The start level is the median of the first (up to) ten losses, as the detectors take it: one lucky
            # first batch must not make a healthy run read as a rising loss. The end is the last value, so a
            # blow-up in the last steps is not averaged away.
            early = finite[: min(10, max(1, len(finite) // 2))]
            a = sorted(v for _, v in early)[len(early) // 2]
            (s1, b) = finite[-1]
            start = (f"at step {early[0][0]}" if len(early) == 1
                     else f"at the start (median of steps {early[0][0]}\u2013{early[-1][0]})")
            text = f"Loss: from {fmt(a)} {start} to {fmt(b)} at step {s1}"
            if a > 0 and b > rise * a:
                unwell = True
                text += f", it rose {times(b / a)}"
                if not diags:
                    text += ": training diverged although no gradient rule fired"
            lines.append(text + ".")
        if bad_loss is not None:
            unwell = True
            lines.append(f"Loss: non-finite from step {bad_loss}.")

    if run.actions:
        lines.append(f"gradguard acted: {action_counts(run.actions)} (below).")
    samples = update_samples(run)
    every = run.meta.get("options", {}).get("sample_every") if isinstance(run.meta.get("options"), dict) else None
    no_optimizer = "optimizer" in run.meta and run.meta["optimizer"] is None  # a loop that updates weights itself
    if samples and no_optimizer and not any(v is not None for _, ratios in samples for v in ratios.values()):
        lines.append("Update sizes: not measured (no optimizer: the loop changes its weights itself, out of "
                     f"gradguard's sight). Dead and saturated units: judged at {plural(len(samples), 'sampled step')}.")
    elif samples:
        lines.append(f"Update sizes, dead and saturated units: judged at {plural(len(samples), 'sampled step')}.")
    else:
        lines.append("Update sizes, dead and saturated units: not judged, no step was sampled"
                     + (f" (one every {fmt(every)} steps)." if every is not None else "."))

    lines.extend(f"gradguard said at step {fmt(e['step'])}: {e['message']}" for e in run.remarks if e["message"])

    if diags:
        worst = next(s for s in ("error", "warning", "info", None)
                     if s is None or any(d["severity"] == s for d in diags))
        kinds: dict[str, list[dict[str, Any]]] = {}
        for d in sorted(diags, key=lambda d: d["step"]):  # kinds in the order they first appeared
            kinds.setdefault(d["kind"], []).append(d)
        parts = [f"{k} (first at step {min(d['step'] for d in ds)}" + (f", {len(ds)} times)" if len(ds) > 1 else ")")
                 for k, ds in kinds.items()]
        return "Problems found: " + "; ".join(parts), lines, worst or "warning"
    if unwell:
        return "No diagnosis, but the run is not healthy", lines, "warning"
    if n_steps < warmup:
        return "No diagnosis, but too few steps to judge", lines, "info"
    if n_steps < window:
        return f"No diagnoses in {n_steps:,} steps (a short run: trends judged only in part)", lines, "info"
    return "No diagnoses: healthy as far as the gradients show", lines, "ok"


def first_sentence(text: str) -> str:
    """The first sentence of a message (up to its first ". "), for a line read at a glance."""
    head, sep, _ = text.partition(". ")
    return head + "." if sep else text


def leads(run: Run) -> list[dict[str, str]]:
    """What a reader takes in first, one entry per diagnosis kind in the order the kinds first appeared, from its
    first diagnosis: ``severity``, ``when`` ("step 109"), ``kind``, ``where`` (the layers named, most implicated
    first), ``what`` (the first sentence of its message) and ``fix`` (its first remedy; empty when it has none).
    A consequence names its cause in its first remedy (``gradguard.detect.advice``), so the first entry whose fix
    is not about an earlier diagnosis is the one to act on."""
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for d in sorted(run.diagnoses, key=lambda d: d["step"]):
        if d["kind"] in seen:
            continue
        seen.add(d["kind"])
        names = [n or "(root)" for n in d["layers"]]
        where = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        out.append({"severity": d["severity"], "when": f"step {d['step']}", "kind": d["kind"], "where": where,
                    "what": first_sentence(d["message"]), "fix": d["remedies"][0] if d["remedies"] else ""})
    return out
