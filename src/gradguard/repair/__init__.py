"""Repairs: clipping strategies applied to the gradients the Guard already measured, the repair ladder, structural
remedies (functions on a model) and the doctor that tries them.

Room: the repairer. It may touch: ``repair``.
"""

from .adaptive_clip import AutoClip, ZClip, make_clip
from .clip import AGC, ClipMethod, GlobalNorm, LayerNorm, ScalarClip, ValueClip
from .structural import reinit, swap_activations

__all__ = ["AGC", "AutoClip", "ClipMethod", "GlobalNorm", "LayerNorm", "ScalarClip", "ValueClip", "ZClip",
           "make_clip", "reinit", "swap_activations"]
