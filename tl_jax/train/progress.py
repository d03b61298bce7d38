"""Progress of the step loop: a tqdm bar on a terminal, one log line per window elsewhere.

On a terminal (``sys.stderr.isatty()``) tqdm draws its bar, with the loss of
the last logged window. Under nohup, SLURM or a pod worker the bar is off and
every logged window (``config.train.log_every`` steps) prints one ``logging``
line instead::

    step 300/600 (50%) loss=0.1234 accuracy=0.9688 41.2 steps/s ETA 7s

``steps/s`` is measured over the window (host wall time between two logged
windows); the ETA is ``(total - step) / steps_per_s``. The first window
includes compilation, so its rate is low.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("tl_jax")


def format_eta(seconds: float) -> str:
    """``7s``, ``3m05s``, ``2h04m``."""
    if not seconds == seconds or seconds == float("inf"):  # NaN or unknown
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Reports the loop's progress; :meth:`window` is called with every logged train record."""

    def __init__(self, initial: int, total: int, enabled: bool, *, terminal: bool | None = None,
                 metric: str = "train/accuracy"):
        self.total, self.enabled, self.metric = total, enabled, metric
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._last = (initial, time.perf_counter())
        self.steps_per_s = float("nan")
        self.bar = None
        if enabled and self.terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", leave=False)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def window(self, record: dict) -> float:
        """Log ``record`` (a train window ending at ``record['step']``); returns the window's steps/s."""
        step, now = int(record["step"]), time.perf_counter()
        last_step, last_t = self._last
        if step > last_step and now > last_t:
            self.steps_per_s = (step - last_step) / (now - last_t)
        self._last = (step, now)
        loss = record.get("train/loss", float("nan"))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.enabled:
            extra = f" {self.metric.split('/')[-1]}={record[self.metric]:.4f}" if self.metric in record else ""
            eta = (self.total - step) / self.steps_per_s if self.steps_per_s > 0 else float("nan")
            log.info("step %d/%d (%d%%) loss=%.4f%s %.1f steps/s ETA %s", step, self.total,
                     100 * step // max(self.total, 1), loss, extra, self.steps_per_s, format_eta(eta))
        return self.steps_per_s

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
