"""Training progress on stderr: a rich progress bar on a terminal, plain epoch lines otherwise."""

from __future__ import annotations

import sys
from typing import Any


class Reporter:
    """Training progress on stderr: a rich progress bar when stderr is a terminal, one plain line
    per epoch otherwise (readable in CI logs), nothing when quiet or not on rank 0."""

    def __init__(self, quiet: bool = False, enabled: bool = True, title: str = "train"):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.show = enabled and not quiet
        self.live = self.show and sys.stderr.isatty()
        self.title = title
        self.progress = None
        self.task = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self.progress.start()
        desc = f"{self.title} epoch {epoch + 1}/{epochs}"
        if self.task is None:
            self.task = self.progress.add_task(desc, total=steps, info="")
        else:
            self.progress.reset(self.task, total=steps, description=desc, info="")

    def step(self, done: int, info: str = "") -> None:
        if self.live and self.task is not None:
            self.progress.update(self.task, completed=done, **({"info": info} if info else {}))

    def epoch_line(self, rec: dict[str, Any], epochs: int) -> None:
        if not self.show:
            return
        parts = [f"epoch {rec['epoch']}/{epochs}", f"loss {rec['loss']:.4f}", f"train {100 * rec['train_acc']:.1f}%"]
        if "val_acc" in rec:
            parts.append(f"val {100 * rec['val_acc']:.2f}%")
        if "test_acc" in rec:
            s = f"test {100 * rec['test_acc']:.2f}%"
            if "test_acc_net2" in rec:  # two networks: both, and their averaged prediction
                s += f" / {100 * rec['test_acc_net2']:.2f}% (ensemble {100 * rec['test_acc_ensemble']:.2f}%)"
            parts.append(s)
        sel = [_selection(rec, p) for p in ("fine", "fine2") if f"{p}_kept" in rec]
        if sel:
            parts.append("FINE kept " + " / ".join(sel))
        parts += [f"{rec['img_per_s']:.0f} img/s", f"{rec['time_s']:.1f}s"]
        self.print("  ".join(parts))

    def print(self, text: str) -> None:
        if self.show:
            self.console.print(text, markup=False, soft_wrap=True)  # one line per epoch, never wrapped

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.task = None


def _selection(rec: dict[str, Any], prefix: str) -> str:
    s = f"{rec[prefix + '_kept']}/{rec[prefix + '_total']}"
    if f"{prefix}_precision" in rec:
        s += f" (P {rec[prefix + '_precision']:.3f} R {rec[prefix + '_recall']:.3f})"
    return s
