"""Mode mistakes: the four ways train/eval and gradient modes get mixed up, each said with what it changes.

The Guard observes forwards through hooks on the root module only; these functions turn what it saw into
verdicts. Inputs are plain host facts (module flags, buffer version counters, generator states): nothing here
reads a device value.

Room: the mode watcher. It may touch: ``detect``, ``modes``, ``types``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..modes import ModeProfile
from ..types import Diagnosis, Severity
from .reporter import Verdict

FIX_EVAL = ("evaluate inside `with gradguard.inference(model):` (eval mode + inference_mode, every flag restored "
            "after), or call model.eval() before and model.train() after")


def _consequences(profiles: list[tuple[str, nn.Module, ModeProfile]]) -> str:
    parts = []
    if any(p.stochastic_in_training for _, _, p in profiles):
        parts.append("dropout is active: outputs differ on every call and are noisier than the model's real "
                     "predictions")
    if any(p.mutates_state_in_training for _, _, p in profiles):
        parts.append("BatchNorm normalises with this batch's statistics instead of its running statistics (a batch "
                     "of one fails or gives garbage) and overwrites those statistics")
    if not parts:
        parts.append("code that reads self.training takes its training branch")
    return "; ".join(parts)


def train_mode_inference(step: int, training: list[tuple[str, nn.Module, ModeProfile]],
                         by_hand_mc: bool = False) -> Verdict:
    """A forward with gradients disabled while flag-dependent modules were in training mode.

    Args:
        step: optimizer steps taken so far.
        training: the flag-dependent modules that were in training mode.
        by_hand_mc: the model is in eval and only dropout-like modules are in training, as Monte-Carlo dropout
            done by hand looks: said as information, not as an error.
    """
    names = [n for n, _, _ in training]
    if by_hand_mc:
        msg = (f"An eval-mode forward with gradients off ran with {len(names)} dropout module(s) in training mode: "
               f"{_list(names)}. If this is Monte-Carlo dropout, say so with gradguard.inference(model, "
               "keep_training=...) and this note goes away; if not, outputs differ on every call.")
        d = Diagnosis("train_mode_inference", "info", step, names, msg, {"modules_in_training": float(len(names))},
                      [FIX_EVAL])
        return Verdict(("train_mode_inference",), (tuple(names), "info"), d)
    msg = (f"A forward ran with gradients off (an evaluation) while {len(names)} module(s) whose behaviour depends "
           f"on the training flag were in training mode: {_list(names)}. {_capital(_consequences(training))}. "
           "torch.no_grad()/inference_mode() only stop gradient tracking; they do not switch modes.")
    ev = {"modules_in_training": float(len(names)),
          "stochastic": float(sum(p.stochastic_in_training for _, _, p in training)),
          "state_mutating": float(sum(p.mutates_state_in_training for _, _, p in training))}
    d = Diagnosis("train_mode_inference", "error", step, names, msg, ev, [FIX_EVAL])
    return Verdict(("train_mode_inference",), (tuple(names),), d)


def inference_mutates_state(step: int, buffers: list[str], why: str) -> Verdict:
    """Buffers changed by a forward that was meant to be inference (gradients off, or the model in eval mode).

    Args:
        step: optimizer steps taken so far. buffers: qualified names of the changed buffers.
        why: "no_grad" or "eval": what made the forward an inference forward.
    """
    modules = sorted({b.rpartition(".")[0] for b in buffers})
    bn = any(b.endswith(("running_mean", "running_var", "num_batches_tracked")) for b in buffers)
    what = ("validation batches are overwriting BatchNorm running statistics: the model you evaluate changes as you "
            "evaluate it, and training resumes from statistics of the evaluation data" if bn else
            "the model's state changes every time it is evaluated, so evaluations are not repeatable")
    ctx = "with gradients off" if why == "no_grad" else "in eval mode"
    msg = f"An inference forward ({ctx}) changed {len(buffers)} buffer(s): {_list(buffers)}. {_capital(what)}."
    d = Diagnosis("inference_mutates_state", "error", step, modules, msg, {"buffers_changed": float(len(buffers))},
                  [FIX_EVAL, "if a custom module caches state in forward, update it only when self.training"])
    return Verdict(("inference_mutates_state",), (tuple(modules),), d)


# Torch functions that draw random numbers to drop or mask (dropout left on in eval is a bug); any other draw is
# a sample (torch.randn_like, Tensor.normal_, torch.multinomial), which may be the model's design.
_DROPOUT = ("dropout", "bernoulli", "scaled_dot_product_attention", "rrelu")


def stochastic_inference(step: int, modules: list[str], draws: Sequence[str] = (), model: str = "") -> Verdict:
    """An eval-mode forward drew random numbers.

    Args:
        step: optimizer steps taken so far. modules: where the replay saw them drawn (may be empty).
        draws: the torch functions that drew them (``locate_rng``; may be empty). model: the model's class name,
            shown for the root module.
    """
    shown = [n or f"{model or 'the model'} (the model itself)" for n in modules]
    where = f" in {_list(shown)}" if modules else ""
    sampled = bool(draws) and not any(k in d for d in draws for k in _DROPOUT)
    by = f" ({', '.join(list(draws)[:4])})" if draws else ""
    mark = ("guard.mark_stochastic(module) (or Guard(..., stochastic=[module])); under gradguard run: --stochastic "
            + (repr(modules[0] or "(root)") if modules else "NAME"))
    severity: Severity
    if sampled:
        severity, msg = "warning", (
            f"A forward in eval mode sampled random numbers{where}{by}: its outputs, and the metrics computed from "
            "them, change from one evaluation to the next. That is the design of a VAE's reparameterisation, a "
            "noise layer or a stochastic policy; elsewhere it is a bug.")
        remedies = [f"if the sampling is by design, say so and gradguard leaves it alone: {mark}",
                    "otherwise sample only in training (if self.training: z = mu + eps * std, else z = mu)"]
    else:
        severity, msg = "error", (
            f"A forward in eval mode drew random numbers{where}{by}: its outputs are random even in eval mode, so "
            "evaluation results are not reproducible. Typical causes: F.dropout(x, p) left at its default "
            "training=True, or scaled_dot_product_attention(..., dropout_p>0) called in eval.")
        remedies = ["pass the module's flag: F.dropout(x, p, training=self.training)",
                    "for attention: dropout_p=self.p if self.training else 0.0",
                    f"if the module samples on purpose (a VAE, a diffusion step), say so: {mark}"]
    d = Diagnosis("stochastic_inference", severity, step, shown, msg, {"modules": float(len(modules))}, remedies)
    return Verdict(("stochastic_inference",), (tuple(modules),), d)


def eval_mode_training(step: int, in_eval: list[tuple[str, nn.Module, ModeProfile]]) -> Verdict:
    """The optimizer trained the model while flag-dependent modules, whose parameters it trains, were in eval.

    Args:
        step: optimizer steps taken so far. in_eval: those modules.
    """
    names = [n for n, _, _ in in_eval]
    parts = []
    if any(p.stochastic_in_training for _, _, p in in_eval):
        parts.append("dropout is off, so the model trains without the regularisation it was built with")
    if any(p.mutates_state_in_training for _, _, p in in_eval):
        parts.append("BatchNorm uses its running statistics instead of batch statistics, and never updates them")
    if not parts:
        parts.append("code that reads self.training takes its inference branch while training")
    sev: Severity = "warning"
    msg = (f"The optimizer is training the model while {len(names)} module(s) with train/eval behaviour are in eval "
           f"mode: {_list(names)}. {_capital('; '.join(parts))}. This usually means a model loaded or validated "
           "in eval mode was not put back with model.train().")
    d = Diagnosis("eval_mode_training", sev, step, names, msg, {"modules_in_eval": float(len(names))}, [
        "call model.train() before the training loop (and after each validation)",
        "if it is deliberate (frozen BatchNorm while fine-tuning), say so: guard.mark_frozen(module)",
    ])
    return Verdict(("eval_mode_training",), (tuple(names),), d)


def _list(names: list[str], k: int = 4) -> str:
    shown = ", ".join(f"'{n or '(root)'}'" for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _capital(s: str) -> str:
    return s[:1].upper() + s[1:]
