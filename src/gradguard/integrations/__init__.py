"""Thin adapters that attach a ``gradguard.Guard`` to a training framework.

- ``gradguard.integrations.lightning.GradGuardCallback``: a Lightning ``Callback`` (``lightning.pytorch`` or the
  standalone ``pytorch_lightning`` package).
- ``gradguard.integrations.transformers.GradGuardTrainerCallback`` (and ``attach(trainer, ...)``): a Hugging Face
  ``transformers.TrainerCallback``.

Nothing is imported here: importing ``gradguard`` or this package never imports Lightning or transformers; each
adapter imports its framework when its own module is imported.

Room: above the Guard. It may touch: no other module.
"""

from __future__ import annotations

__all__: list[str] = []
