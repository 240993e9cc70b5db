"""What a person watches during a run: a rich progress bar, and the loss curve afterwards."""

from __future__ import annotations

from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from loragate.console import console


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
