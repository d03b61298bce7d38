"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow.

A *writer* has four methods: ``scalars(step, {tag: value})``, ``text(tag, text)``,
``image(tag, png_path, step)`` and ``close()``. The workdir's JSON lines stay the
record every guarantee is built on (resume, reports); writers are views of it,
chosen by ``config.tracking``:

* ``tensorboard`` (default on): event files written into the workdir itself by
  ``tensorboardX`` (no TensorFlow), so ``tensorboard --logdir runs/study`` shows
  one run per workdir, named like the sweep point. A resumed run writes a purge
  marker at the restored step, so TensorBoard drops the steps logged again.
* ``wandb``: a run named after the workdir, ``mode`` 'offline' by default
  (``wandb sync`` uploads later), its id derived from the workdir's path, so a
  resumed run continues the same W&B run.
* ``mlflow``: a run in ``tracking_uri`` (default: a local file store ``<workdir>/mlruns``).

A tracker that is not installed, or fails to start or to write, costs one
warning and is dropped: it never stops the run. Only process 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import sys
from typing import Any, Protocol

from tl_jax.util.log_once import warn_once

log = logging.getLogger("tl_jax")


class Writer(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def text(self, tag: str, text: str) -> None: ...

    def image(self, tag: str, png: pathlib.Path, step: int = 0) -> None: ...

    def close(self) -> None: ...


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardWriter:
    """Event files in ``logdir`` (tensorboardX); ``purge_step``: drop earlier events from this step on."""

    def __init__(self, logdir: str | pathlib.Path, purge_step: int | None = None):
        SummaryWriter = _import_tensorboardx()

        self.w = SummaryWriter(logdir=str(logdir), purge_step=purge_step, flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in _numbers(values).items():
            self.w.add_scalar(tag, value, step)

    def text(self, tag: str, text: str) -> None:
        self.w.add_text(tag, text, 0)

    def image(self, tag: str, png: pathlib.Path, step: int = 0) -> None:
        import numpy as np
        from PIL import Image

        self.w.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.w.close()


def _import_tensorboardx():
    """``tensorboardX.SummaryWriter``, imported without PyTorch.

    tensorboardX's writer imports ``torch`` whenever it is installed, only to accept torch tensors (1.6 s of
    a process's start on 2 cores); tl_jax writes floats and numpy arrays. ``torch`` is hidden for that import
    unless something imported it already (then it costs nothing)."""
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX falls back to numpy
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class WandbWriter:
    def __init__(self, workdir: pathlib.Path, cfg: dict, project: str, mode: str):
        import wandb

        run_id = hashlib.sha1(str(workdir).encode()).hexdigest()[:16]
        self.wandb = wandb
        self.run = wandb.init(project=project, name=workdir.name, id=run_id, dir=str(workdir), mode=mode,
                              config=cfg, resume="allow", reinit="finish_previous")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(_numbers(values), step=step)

    def text(self, tag: str, text: str) -> None:
        self.run.summary[tag] = text

    def image(self, tag: str, png: pathlib.Path, step: int = 0) -> None:
        self.run.log({tag: self.wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowWriter:
    def __init__(self, workdir: pathlib.Path, cfg: dict, tracking_uri: str):
        import mlflow

        self.mlflow = mlflow
        if not tracking_uri:  # a local file store in the workdir: offline, no server, no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(tracking_uri or (workdir / "mlruns").absolute().as_uri())
        self.run = mlflow.start_run(run_name=workdir.name)
        flat = _flatten(cfg)
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({k.replace("@", "_"): v for k, v in _numbers(values).items()}, step=step)

    def text(self, tag: str, text: str) -> None:
        self.mlflow.log_text(text, f"{tag}.txt")

    def image(self, tag: str, png: pathlib.Path, step: int = 0) -> None:
        self.mlflow.log_artifact(str(png))

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Trackers:
    """The run's writers; each call goes to every writer, and a failing writer is dropped with a warning."""

    def __init__(self, writers: list[tuple[str, Writer]]):
        self.writers = writers

    def _each(self, method: str, *args: Any) -> None:
        for name, w in list(self.writers):
            try:
                getattr(w, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker never stops a run
                log.warning("tracker %s failed in %s (%s: %s); it is turned off for this run", name, method,
                            type(e).__name__, e)
                self.writers.remove((name, w))

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        self._each("scalars", int(step), values)

    def text(self, tag: str, text: str) -> None:
        self._each("text", tag, text)

    def image(self, tag: str, png: pathlib.Path, step: int = 0) -> None:
        self._each("image", tag, png, step)

    def close(self) -> None:
        self._each("close")
        self.writers = []


def open_trackers(tracking: Any, workdir: str | pathlib.Path, cfg: dict, step0: int = 0) -> Trackers:
    """The writers ``config.tracking`` asks for, each started or reported in one warning."""
    workdir = pathlib.Path(workdir).absolute()
    makers = []
    if tracking.tensorboard:
        makers.append(("tensorboard", lambda: TensorBoardWriter(workdir, purge_step=step0 + 1 if step0 else None)))
    if tracking.wandb:
        makers.append(("wandb", lambda: WandbWriter(workdir, cfg, tracking.wandb_project, tracking.wandb_mode)))
    if tracking.mlflow:
        makers.append(("mlflow", lambda: MlflowWriter(workdir, cfg, tracking.mlflow_tracking_uri)))
    writers = []
    for name, make in makers:
        try:
            writers.append((name, make()))
        except ImportError as e:
            warn_once(log, "config.tracking.%s is on but %s is not installed (%s); pip install %s", name, name, e,
                      {"tensorboard": "tensorboardX"}.get(name, name))
        except Exception as e:  # noqa: BLE001 - a tracker that fails to start never loses a run
            log.warning("config.tracking.%s failed to start (%s: %s); training without it", name,
                        type(e).__name__, e)
    trackers = Trackers(writers)
    if step0 == 0:
        trackers.text("config", "```\n" + json.dumps(cfg, indent=2, sort_keys=True) + "\n```")
    return trackers
