"""MLflow sink: statistics as step-indexed metrics, diagnoses and actions as a JSONL artifact plus count tags.

Needs ``mlflow`` or ``mlflow-skinny`` (``pip install 'gradguard[mlflow]'``), imported only when a sink is created.

Choices, and why:

- Metrics go through ``MlflowClient.log_batch`` with the run id fixed when the sink is created: one request per
  statistics read (MLflow splits batches over its 1000-metric limit itself), explicit ``step=`` (MLflow, unlike
  W&B, accepts any step, so gradguard's step is the x-axis and the user's own metrics are untouched), and no
  dependence on which run happens to be active in the calling thread later.
- Metric names may only hold letters, digits, ``_ - . / space`` (and ``:`` except on Windows), must not resolve to
  another path (no empty, ``.`` or ``..`` part) and are at most 250 characters. Layer names are module paths
  (dots are fine) but a ``ModuleDict`` key may hold anything, and the model's own parameters have the layer name
  "(root)": such characters become ``_`` ("(root)" becomes ``_root_``).
- NaN and Inf are logged as they are. MLflow keeps NaN in every backend; its database backends store +/-Inf as
  +/-1.8e308 (the file store keeps Inf). The diagnosis naming the non-finite step is in the artifact either way.
- Diagnoses and actions: ``{prefix}/events.jsonl``, the same lines as a run directory's events.jsonl (NaN written
  as "nan"), rewritten whole at each event (MLflow artifacts cannot be appended to; diagnoses are deduplicated, so
  the file stays small); and a tag ``{prefix}/count/{kind}`` per kind, searchable in the runs table. Clipping
  happens at every clipped step, so it is the metric ``{prefix}/clipped_norm`` instead, sent with the next read.

Room: the outputs. It may touch: ``report``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from typing import Any

from . import BackendErrors, stats_scalars
from .sinks import _clean

MAX_KEY = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
_BAD = re.compile(r"[^\w.\- /]")  # the allowed set, minus ":" (refused on Windows)


def mlflow_key(name: str) -> str:
    """A valid MLflow metric or tag name for ``name``, unchanged when it already is one.

    Args:
        name: a ``/``-separated name such as ``"gradguard/grad_norm/encoder.layers.0"``.

    Returns:
        The name with characters MLflow refuses replaced by ``_``, empty or ``.``/``..`` parts replaced by
        underscores, and, if longer than 250 characters, shortened with a hash of the full name kept at the end.
    """
    parts = [_BAD.sub("_", part) for part in name.split("/")]
    parts = [part if part.strip(".") else "_" * max(len(part), 1) for part in parts]
    key = "/".join(parts)
    if len(key) > MAX_KEY:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        key = key[: MAX_KEY - 11] + "_" + digest
    return key


class MlflowSink:
    """Writes gradguard's records to an MLflow run.

    Per statistics read, at ``step`` = the record's step: ``{prefix}/total_grad_norm``, ``total_grad_norm_max``,
    ``loss``, ``grad_norm_mean``/``std``, ``loss_mean``/``std``, ``{prefix}/grad_norm/{layer}``; at each new sampled
    step ``{prefix}/weight_norm/{layer}`` and ``{prefix}/update_ratio/{layer}``; ``{prefix}/clipped_norm`` at each
    clipped step. Diagnoses and actions: the artifact ``{prefix}/events.jsonl`` and tags ``{prefix}/count/{kind}``.
    See the module docstring for names, NaN handling and why.

    Example::

        with mlflow.start_run():
            guard = gg.Guard(model, opt, sinks=[MlflowSink()])
    """

    def __init__(self, run_id: str | None = None, prefix: str = "gradguard", tracking_uri: str | None = None) -> None:
        """Attach to an MLflow run.

        Args:
            run_id: the run to log to; default: the active run (``mlflow.start_run()``), fixed now.
            prefix: first part of every metric name, tag and artifact path.
            tracking_uri: the tracking server or store; default: MLflow's current tracking URI.

        Raises:
            ImportError: mlflow is not installed.
            RuntimeError: no run id was given and no run is active.
        """
        try:
            import mlflow
            from mlflow.entities import Metric, RunTag
        except ImportError as e:
            raise ImportError("MlflowSink needs mlflow: pip install 'gradguard[mlflow]'") from e
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise RuntimeError("MlflowSink needs an MLflow run: call mlflow.start_run() before creating the "
                                   "sink, or pass run_id=")
            run_id = active.info.run_id
        self.run_id: str = run_id
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self._Metric = Metric
        self._RunTag = RunTag
        self.prefix = prefix.rstrip("/")
        self._keys: dict[str, str] = {}  # gradguard name -> MLflow name, computed once per name
        self._pending: list[Any] = []  # clip metrics, sent with the next statistics read
        self._events: list[str] = []
        self.counts: Counter[str] = Counter()
        self._last_sample: int | None = None  # each sample is repeated in every record until the next one
        self._errors = BackendErrors("MLflow")
        self._closed = False

    def _key(self, name: str) -> str:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = mlflow_key(name)
        return key

    def _metrics(self, values: dict[str, float], step: int, ms: int) -> list[Any]:
        return [self._Metric(self._key(k), v, ms, step) for k, v in values.items()]

    def write(self, record: dict[str, Any]) -> None:
        """Take one record: stats become metrics, events go to the artifact and the count tags.

        Args:
            record: a gradguard record; other types are ignored.
        """
        if self._closed:
            return
        kind = record.get("type")
        ms = int(time.time() * 1000)
        if kind == "stats":
            now, sampled = stats_scalars(record, self.prefix)
            metrics = self._pending + self._metrics(now, int(record["step"]), ms)
            tags = [self._clip_tag()] if self._pending else []
            self._pending = []
            sample_step = record.get("sample_step")
            if sampled and sample_step is not None and sample_step != self._last_sample:
                self._last_sample = int(sample_step)
                metrics += self._metrics(sampled, int(sample_step), ms)
            self._errors.call(self.client.log_batch, self.run_id, metrics=metrics, tags=tags)
        elif kind in ("diagnosis", "action"):
            detail = record.get("detail") or {}
            if kind == "action" and record.get("kind") == "clip" and "clipped_norm" in detail:
                self._pending += self._metrics({f"{self.prefix}/clipped_norm": float(detail["clipped_norm"])},
                                               int(record["step"]), ms)
                self.counts["clip"] += 1
                return
            self._events.append(json.dumps(_clean(record), allow_nan=False))
            self.counts[str(record.get("kind"))] += 1
            self._errors.call(self.client.log_text, self.run_id, "\n".join(self._events) + "\n",
                              self._key(f"{self.prefix}/events.jsonl"))
            tag = self._key(f"{self.prefix}/count/{record.get('kind')}")
            self._errors.call(self.client.set_tag, self.run_id, tag, str(self.counts[str(record.get("kind"))]))

    def close(self) -> None:
        """Send pending clip metrics; the run is left open (it is the user's). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._pending:
            self._errors.call(self.client.log_batch, self.run_id, metrics=self._pending, tags=[self._clip_tag()])
            self._pending = []

    def _clip_tag(self) -> Any:
        return self._RunTag(self._key(f"{self.prefix}/count/clip"), str(self.counts["clip"]))
