"""Advice that fits the model: the judge's last word on each diagnosis before it is reported (room 2, the judge).

The detectors attach generic remedies (``REMEDIES`` of each detector module). This module rewrites them with what
the Guard knows about the model and about itself, collected once at attach (``model_facts``), never per step:

- the activation, recurrent, normalisation and residual module types present: a ReLU net is not told to drop
  sigmoid for ReLU, an LSTM is not told to use a gated recurrent layer, a model with LayerNorm is not told to add
  normalisation, nor one with residual blocks to add them (a Post-LN Transformer is told to put the norm first);
- the Guard options in force: with ``repair="auto"`` on, no remedy says to turn it on; with ``clip=`` set, no
  remedy says to start clipping; without an optimizer (a loop that updates its weights itself) no remedy offers
  ``repair="auto"``, which acts on optimizer steps;
- the diagnoses already reported: a consequence names its cause (dead or saturated units, or NaN/Inf, reported
  after a gradient explosion: "fix the explosion at step N first").

It reads the model's module types (``torch.nn``) at attach and the detectors' remedy constants.

Room: the judge. It may touch: ``detect``, ``types``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from ..types import Diagnosis
from . import early, exploding, nonfinite, stalled, units, vanishing

SATURATING = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Hardsigmoid)
NON_SATURATING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                  nn.Mish, nn.Softplus, nn.Hardswish)
NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                      *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
#: How long after a gradient explosion a new condition is read as its consequence (in optimizer steps): dead units
#: are reported only after several sampled batches (``sample_every`` steps apart) agree.
CAUSE_WITHIN = 500
#: A consequence (diagnosis kind) -> the kind of diagnosis that causes it, and what to call each. Dead ReLUs pass
#: no gradient, so the layers below them receive almost none: vanishing through depth behind dead units.
CAUSES = {"dead_units": ("exploding", "these units died after the explosion"),
          "saturation": ("exploding", "these units saturated after the explosion"),
          "nonfinite": ("exploding", "the NaN/Inf came after the explosion"),
          "vanishing": ("dead_units", "the gradient vanishes behind the dead units reported")}


@dataclass(frozen=True)
class ModelFacts:
    """What the advice reads about the model and the Guard, taken once at attach.

    Attributes:
        saturating: class names of the saturating activation modules present (Sigmoid, Tanh, ...).
        activations: True when the model has any activation module (with none, functional activations may hide
            inside ``forward``, and nothing is assumed about them).
        recurrent: recurrent module name -> its cell ("LSTM", "GRU", "RNN_TANH", "RNN_RELU").
        norms: class names of the normalisation modules present (BatchNorm1d, LayerNorm, ...).
        repair: ``repair="auto"`` is on.
        clip: the clipping gradguard applies (``clip=``), as text, or None.
        optimizer: a torch.optim optimizer steps the weights (False: the loop updates them itself; repair, which
            skips, backs off and rolls back optimizer steps, cannot act).
        residual: class names of the modules known to add their input back to their output (``_residual``).
        post_norm: a torch Transformer layer normalises after its residual addition (``norm_first=False``).
    """

    saturating: tuple[str, ...] = ()
    activations: bool = False
    recurrent: dict[str, str] = field(default_factory=dict)
    norms: tuple[str, ...] = ()
    repair: bool = False
    clip: str | None = None
    optimizer: bool = True
    residual: tuple[str, ...] = ()
    post_norm: bool = False


def model_facts(model: nn.Module, repair: bool, clip: object | None, optimizer: bool = True) -> ModelFacts:
    """Read the facts once, at attach.

    Args:
        model: the model (unwrapped: names as in ``model.named_modules()``).
        repair: whether ``repair="auto"`` is on. clip: the ``clip=`` option (a max norm, a method name, a
            ClipMethod or None). optimizer: whether the Guard has an optimizer.

    Returns:
        The facts.
    """
    sat: dict[str, None] = {}
    norms: dict[str, None] = {}
    recurrent: dict[str, str] = {}
    residual: dict[str, None] = {}
    acts, post_norm = False, False
    for name, m in model.named_modules():
        if _residual(m):
            residual[type(m).__name__] = None
            post_norm = post_norm or getattr(m, "norm_first", None) is False
        if isinstance(m, nn.RNNBase):
            recurrent[name] = str(m.mode)
        elif isinstance(m, NORMS):
            norms[type(m).__name__] = None
        elif isinstance(m, SATURATING):
            acts = True
            sat[type(m).__name__] = None
        elif isinstance(m, NON_SATURATING):
            acts = True
        # Activations held as functions (nn.TransformerEncoderLayer's F.relu/F.gelu, a block's self.act = F.silu)
        # or as modules of other libraries (transformers' GELUActivation): known by their names.
        for held in [m] + [getattr(m, a, None) for a in HELD if not isinstance(getattr(m, a, None), nn.Module)]:
            kind = _activation_kind(held)
            if kind == "saturating":
                sat[getattr(held, "__name__", type(held).__name__)] = None
            acts = acts or kind is not None
    clip_text = None if clip is None else (str(clip) if isinstance(clip, (int, float, str)) else type(clip).__name__)
    return ModelFacts(tuple(sat), acts, recurrent, tuple(norms), bool(repair), clip_text, bool(optimizer),
                      tuple(residual), post_norm)


def _residual(m: nn.Module) -> bool:
    """Whether ``m`` is known to add its input back to its output (a residual block): torch's Transformer layers;
    transformers' decoder and encoder layers and blocks (GPT2Block, BertLayer, LlamaDecoderLayer; not a mixture
    of experts' block, which is a layer's MLP); torchvision's and timm's ResNet and ViT blocks; any class whose name
    says so (ResidualBlock, ResBlock). Read from types only: nothing here runs the model."""
    if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return True
    name, home = type(m).__name__, type(m).__module__
    if "Residual" in name or "ResBlock" in name:
        return True
    if home.startswith("transformers.models."):
        return name.endswith(("Block", "Layer")) and not any(w in name for w in ("Moe", "MoE", "Sparse", "Norm"))
    return home.startswith(("torchvision.models.", "timm.models.")) and name in ("BasicBlock", "Bottleneck", "Block")


HELD = ("activation", "act", "act_fn", "activation_fn", "nonlinearity")  # where a module keeps its activation


def _activation_kind(f: object) -> str | None:
    """"saturating", "non_saturating" or None for an activation known by name: a function (``F.relu``,
    ``torch.tanh``), or a module class outside torch.nn (transformers' ``GELUActivation``). tanh and sigmoid
    saturate; the ReLU family, GELU, SiLU and Mish do not."""
    if isinstance(f, types.FunctionType | types.BuiltinFunctionType):
        name = f.__name__.lower()
        if name in ("tanh", "sigmoid", "hardtanh", "hardsigmoid", "softsign"):
            return "saturating"
        return "non_saturating" if name in FUNCTIONAL else None
    if isinstance(f, nn.Module) and not type(f).__module__.startswith("torch.nn"):
        name = type(f).__name__  # case kept: "ELU" must not match PixelUnshuffle
        if any(k in name for k in ("ReLU", "GELU", "SiLU", "Swish", "Mish", "ELU")):
            return "non_saturating"
        if any(k in name for k in ("Tanh", "Sigmoid")):
            return "saturating"
    return None


FUNCTIONAL = {"relu", "relu_", "relu6", "leaky_relu", "gelu", "silu", "elu", "selu", "celu", "mish", "hardswish",
              "softplus", "prelu", "rrelu"}


def _cause(d: Diagnosis, earlier: Sequence[Diagnosis]) -> Diagnosis | None:
    """The diagnosis ``d`` most likely follows from (``CAUSES``): the latest of its cause's kind at or before its
    step (within ``CAUSE_WITHIN`` steps), provided ``d``'s condition was not already reported in the same layers
    before it. Vanishing through time is not a consequence of dead units (a recurrent layer has none)."""
    if d.kind not in CAUSES or "early_late_time_ratio" in d.evidence:
        return None
    kind = CAUSES[d.kind][0]
    cause = next((e for e in reversed(earlier) if e.kind == kind and e.step <= d.step), None)
    if cause is None or d.step - cause.step > CAUSE_WITHIN:
        return None
    same = set(d.layers[:1])
    if any(e.kind == d.kind and e.step < cause.step and (not same or same & set(e.layers)) for e in earlier):
        return None  # it was there before the explosion: not its consequence
    return cause


def _clipped(d: Diagnosis, earlier: Sequence[Diagnosis], f: ModelFacts) -> str | None:
    """How the gradients are clipped, in words, or None: ``clip=`` of the Guard, or else a clip seen cutting a
    step (a diagnosis whose evidence has ``clipped_norm``: the script's own ``clip_grad_norm_``, say)."""
    if f.clip is not None:
        return f"clip={f.clip}"
    cut = next((e for e in reversed([*earlier, d]) if "clipped_norm" in e.evidence), None)
    return None if cut is None else f"cut to {cut.evidence['clipped_norm']:.3g} at step {cut.step}"


def _rewrite(remedy: str, d: Diagnosis, f: ModelFacts, clip: str | None) -> str | None:
    """One remedy fitted to the model: the same text, another text, or None (it does not apply).

    Args:
        remedy: as the detector wrote it. d: its diagnosis. f: the model facts. clip: ``_clipped``'s answer.
    """
    if remedy == vanishing.REMEDIES_DEPTH[0]:  # "use a ReLU-family activation instead of sigmoid/tanh"
        if f.saturating:
            return remedy.replace("sigmoid/tanh", f"the model's {'/'.join(f.saturating)}")
        return None if f.activations else remedy  # ReLU-family already; unknown when no activation module is seen
    if remedy == vanishing.REMEDIES_DEPTH[2]:  # "add normalisation (BatchNorm/LayerNorm) or residual connections"
        return _depth_structure(remedy, f)
    if remedy in vanishing.REMEDIES_TIME[:2]:
        name = d.layers[0] if d.layers else ""
        cell = f.recurrent.get(name) or (next(iter(set(f.recurrent.values()))) if len(set(f.recurrent.values()))
                                         == 1 else None)
        if cell is None:
            return remedy
        if remedy == vanishing.REMEDIES_TIME[0]:  # "use a gated recurrent layer (LSTM/GRU) instead of a plain RNN"
            if cell == "LSTM":
                return (f"'{name}' is an LSTM already: set its forget-gate bias to 1, so the cell state carries the "
                        "gradient across time steps (gradguard.reinit(model, 'orthogonal') does it)")
            if cell == "GRU":
                return None
            return f"use a gated recurrent layer (nn.LSTM or nn.GRU) instead of the plain nn.RNN '{name}'"
        if cell in ("LSTM", "GRU"):  # identity/IRNN is for a plain RNN only
            return "initialise the recurrent weights orthogonally: gradguard.reinit(model, 'orthogonal')"
        return remedy
    if remedy == units.DEAD_REMEDIES[2] and f.norms:
        return "re-initialise the layer before it (Kaiming, zero or small positive bias)"
    if remedy.startswith("normalisation (LayerNorm/BatchNorm)") and f.norms:  # stalled
        return f"another initialisation (the model already normalises, with {'/'.join(f.norms)})"
    if remedy in (exploding.REMEDIES[1], early.REMEDIES[1]):  # "clip the gradient norm"
        if clip is not None:
            return (f"the gradients are already clipped ({clip}) and these norms are measured before it: a lower "
                    "threshold bounds each step harder, a lower learning rate removes the cause")
        return None if f.repair else remedy  # repair's ladder clips spikes adaptively
    if remedy in (exploding.REMEDIES[2], early.REMEDIES[2], nonfinite.REMEDIES[0]):  # "turn repair='auto' on"
        return None if f.repair or not f.optimizer else remedy  # on already, or nothing for it to act on
    if remedy == nonfinite.REMEDIES[1] and clip is not None:  # "lower the lr, or clip gradients"
        return f"lower the learning rate (the gradients are already clipped, {clip})"
    return remedy


def _depth_structure(remedy: str, f: ModelFacts) -> str | None:
    """The "add normalisation or residual connections" remedy for what the model has of either.

    References:
        Xiong et al., "On Layer Normalization in the Transformer Architecture", ICML 2020 (with the normalisation
        after the residual addition, Post-LN, the layers far from the output receive smaller gradients; Pre-LN
        keeps them level).
    """
    if f.post_norm:
        return ("put each Transformer layer's normalisation before its sublayer (norm_first=True, Pre-LN: with "
                "Post-LN the layers far from the output get smaller gradients, Xiong et al. 2020) or warm the "
                "learning rate up")
    if f.residual and f.norms:
        return None  # residual and normalised already: this remedy has nothing left to offer
    if f.residual:
        return (f"add normalisation (LayerNorm/BatchNorm) inside each residual block (the model has residual "
                f"connections already, in {'/'.join(f.residual)})")
    if f.norms:
        return f"add residual connections (the model already normalises, with {'/'.join(f.norms)})"
    return remedy


def advise(d: Diagnosis, facts: ModelFacts, earlier: Sequence[Diagnosis] = ()) -> Diagnosis:
    """``d`` with remedies that fit the model and the options in force, and its cause named when it is the
    consequence of an explosion reported before it.

    Args:
        d: a diagnosis about to be reported.
        facts: from ``model_facts``, taken at attach.
        earlier: the diagnoses already reported, in the order found.

    Returns:
        A new Diagnosis (``d`` itself when nothing changes).
    """
    clip = _clipped(d, earlier, facts)
    cause = _cause(d, earlier)
    # With its cause named first, "lower the learning rate, or clip if exploding came first" says it twice.
    own = [r for r in d.remedies if cause is None or r != nonfinite.REMEDIES[1]]
    remedies = [r for r in (_rewrite(r, d, facts, clip) for r in own) if r is not None]
    message = d.message
    if not facts.optimizer:  # why update sizes are unknown, now that it is known
        message = message.replace(stalled.UNMEASURED, stalled.NO_OPTIMIZER)
    if cause is not None:
        what = f"{CAUSES[d.kind][1]} at step {cause.step}"
        where = f" in '{cause.layers[0]}'" if cause.kind == "dead_units" and cause.layers else ""
        message += f" {what[0].upper()}{what[1:]}{where}, most likely as a consequence."
        if cause.kind == "exploding":
            fixes = "fix the explosion first (lower the learning rate" + (
                ")" if clip is not None else ", or clip the gradient norm)")
        else:
            fixes = "bring those units back first (lower the learning rate; LeakyReLU/GELU keep a gradient)"
        remedies = [f"{what}: {fixes}", *remedies]
    if facts.repair and d.kind in ("nonfinite", "exploding"):
        remedies.append("repair='auto' is on: gradguard skips, clips and backs off while the run goes on (see its "
                        "actions); that keeps training alive, the remedies above remove the cause")
    if remedies == d.remedies and message == d.message:
        return d
    return dataclasses.replace(d, message=message, remedies=remedies)
