"""The workdir contract.

``--workdir DIR`` holds:

* ``config.json``: the resolved config of the run;
* ``metrics.jsonl``: one JSON object per logged event, each with ``step``
  (e.g. ``{"step": 100, "train/loss": 0.31, "train/accuracy": 0.9}``);
* ``summary.json``: final metrics, at least ``test/accuracy``, ``test/loss``,
  ``steps``, ``wall_s``;
* ``checkpoints/``: orbax checkpoints (see :mod:`tl_jax.train.checkpoint`).

Running again with the same config resumes (a finished run is left as it is:
:func:`tl_jax.train.loop.train`); a larger ``train.steps`` continues it; another
config on a non-empty workdir is an error unless ``overwrite=True``, which
removes exactly the files above (nothing else in DIR is touched). While a run
trains, its process holds ``.lock.<process index>`` (:mod:`tl_jax.train.lock`).
"""
from __future__ import annotations

import json
import math
import pathlib
import shutil
from typing import Any

OWNED = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "run.log", "wandb", "mlruns")
EVENTS_GLOB = "events.out.tfevents.*"


class WorkdirError(ValueError):
    """A workdir that cannot be used for this run."""


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            key = f"{prefix}.{k}" if prefix else k
            if k not in old:  # a key added to the schema since that run: its default applies
                continue
            elif k not in new:
                out.append(f"{key}: {old[k]!r} -> (absent)")
            else:
                out.extend(_diff(old[k], new[k], key))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def config_diff(old: dict, new: dict) -> list[str]:
    """``'key: old -> new'`` for every recorded key whose value differs (keys new to the schema ignored)."""
    return _diff(old, new)


def config_changes(old: dict, new: dict) -> list[str]:
    """:func:`config_diff` less what a run may change on resume: a larger ``train.steps`` continues it."""
    steps = (old.get("train") or {}).get("steps"), (new.get("train") or {}).get("steps")
    longer = all(isinstance(v, int) for v in steps) and steps[1] > steps[0]
    return [c for c in _diff(old, new) if not (longer and c.startswith("train.steps:"))]


class Workdir:
    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path).expanduser().absolute()
        self.trackers = None  # tl_jax.train.trackers.Trackers: every logged record also goes there

    @property
    def config_file(self) -> pathlib.Path:
        return self.path / "config.json"

    @property
    def metrics_file(self) -> pathlib.Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_file(self) -> pathlib.Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> pathlib.Path:
        return self.path / "checkpoints"

    def check(self, config: dict, *, overwrite: bool = False) -> None:
        """Refuse a non-empty workdir with another config (before anything is written)."""
        if self.path.exists() and not self.path.is_dir():
            raise WorkdirError(f"--workdir {self.path} exists and is not a directory")
        if overwrite or not self.path.exists():
            return
        if self.config_file.exists():
            old = json.loads(self.config_file.read_text())
            changes = config_changes(old, config)
            if changes:
                raise WorkdirError(
                    f"--workdir {self.path} holds a run with another config ({'; '.join(changes[:5])}"
                    f"{' ...' if len(changes) > 5 else ''}); use another --workdir, or --overwrite to replace it")
        elif any(self.path.iterdir()) and any((self.path / n).exists() for n in OWNED):
            raise WorkdirError(f"--workdir {self.path} holds tl_jax files but no config.json; "
                               f"use --overwrite to replace them")

    def prepare(self, config: dict, *, overwrite: bool = False, write: bool = True) -> None:
        """Check, then (on overwrite) remove the run's own files and write config.json."""
        self.check(config, overwrite=overwrite)
        if not write:
            return
        if overwrite and self.path.exists():
            for name in OWNED:
                p = self.path / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            for p in self.path.glob(EVENTS_GLOB):  # the run's TensorBoard events (tl_jax/train/trackers.py)
                p.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop logged events after ``step`` (a resume from ``step`` re-logs them)."""
        if not self.metrics_file.exists():
            return
        keep = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if record.get("step", 0) <= step:
                keep.append(line)
        tmp = self.metrics_file.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(self.metrics_file)

    def log(self, record: dict) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
        if self.trackers is not None:
            self.trackers.scalars(record.get("step", 0), record)

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict) -> None:
        tmp = self.summary_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_jsonable(summary), indent=2, sort_keys=True) + "\n")
        tmp.replace(self.summary_file)

    def read_summary(self) -> dict | None:
        return json.loads(self.summary_file.read_text()) if self.summary_file.exists() else None


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out
