"""What a person watches during a run: a rich progress bar on a terminal, a log line per N steps
or per minute elsewhere (CI, a job runner, nohup), and the loss curve afterwards."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from loragate.console import console, errors

Progress_ = Literal["auto", "lines", "none"]


class RichProgress(TrainerCallback):
    """Steps done out of the planned total, with the latest training and validation loss."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task = None
        self._losses = {"loss": "-", "eval_loss": "-"}

    def on_train_begin(self, args, state, control, **kwargs):
        self._progress = Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[losses]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                             losses=self._describe())

    def on_step_end(self, args, state, control, **kwargs):
        self._progress.update(self._task, completed=state.global_step, losses=self._describe())

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self._losses:
            if logs and key in logs:
                self._losses[key] = f"{logs[key]:.4f}"
        if self._progress is not None:
            self._progress.update(self._task, losses=self._describe())

    def on_train_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            self._progress.stop()

    def _describe(self) -> str:
        return f"loss {self._losses['loss']}  val {self._losses['eval_loss']}"


class LineProgress(TrainerCallback):
    """A plain line on stderr every ``every_steps`` steps or ``every_s`` seconds, whichever comes
    first, and at the end: step, training and validation loss, tokens/s, elapsed, ETA. stderr, so
    that ``--json`` keeps stdout for the result."""

    def __init__(self, every_steps: int = 50, every_s: float = 60.0) -> None:
        self.every_steps, self.every_s = every_steps, every_s
        self._losses = {"loss": "-", "eval_loss": "-"}
        self._started = self._last_line = 0.0
        self._first_step = 0
        self._last_text = ""

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = self._last_line = time.monotonic()
        self._first_step = state.global_step
        errors.print(f"training: {state.max_steps} steps" + (f", from step {state.global_step}" if state.global_step
                                                            else ""), highlight=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self._losses:
            if logs and key in logs:
                self._losses[key] = f"{logs[key]:.4f}"
        if logs and "eval_loss" in logs:
            self._line(state)  # a validation result is news

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if state.global_step % self.every_steps == 0 or now - self._last_line >= self.every_s:
            self._line(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._line(state)

    def _line(self, state) -> None:
        now = time.monotonic()
        elapsed = now - self._started
        done = state.global_step - self._first_step
        eta = elapsed / done * (state.max_steps - state.global_step) if done else None
        text = f"step {state.global_step}/{state.max_steps} loss {self._losses['loss']} val {self._losses['eval_loss']}"
        if text == self._last_text:
            return  # the same step and losses, already said
        tokens = state.num_input_tokens_seen or 0
        errors.print(f"{text} tokens/s {tokens / elapsed if elapsed else 0:.0f} elapsed {_clock(elapsed)} "
                     f"eta {_clock(eta) if eta is not None else '-'}", highlight=False)
        sys.stderr.flush()
        self._last_line, self._last_text = now, text


def training_progress(mode: Progress_ = "auto") -> TrainerCallback | None:
    """``auto``: the bar on a terminal, lines otherwise; ``lines``; ``none``."""
    if mode == "none":
        return None
    return RichProgress() if mode == "auto" and console.is_terminal else LineProgress()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def save_loss_curve(log_history: list[dict], path: Path, *, title: str) -> Path:
    """Training and validation loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "training"), ("eval_loss", "validation")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if key == "eval_loss" else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def quiet_library_progress() -> None:
    """datasets' and transformers' own tqdm bars (tokenizing, loading weights) drown the one
    progress bar a person needs; so does a deprecation that transformers raises against itself."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
