"""Repairs: clipping strategies applied to the gradients the Guard already measured."""

from .clip import AGC, AutoClip, ClipMethod, GlobalNorm, LayerNorm, ValueClip, ZClip, make_clip

__all__ = ["AGC", "AutoClip", "ClipMethod", "GlobalNorm", "LayerNorm", "ValueClip", "ZClip", "make_clip"]
