"""Training logs for TensorBoard, VisualDL or Weights & Biases (``--report_to``, ``--logging_dir``).

Every step logs ``train/loss``, ``train/learning_rate``, ``train/step_seconds`` and
``train/vector_norm/I`` (the norm of each placeholder vector), each held-out evaluation
``train/eval_loss`` (``--eval_steps``); each validation round logs its
images under ``validation/promptP``. TensorBoard writes into ``--logging_dir`` itself, so
``tensorboard --logdir OUTPUT_DIR/logs`` shows the run; VisualDL into its ``visualdl``
subfolder; wandb keeps its local files under ``--logging_dir`` too.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from textinv.config import TrainConfig, UserError
from textinv.events import RunContext, StepState, TrainObserver, TrainResult, add_outputs

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "visualdl", "wandb")


class Tracker(Protocol):
    def log_scalars(self, values: dict[str, float], step: int) -> None: ...

    def log_images(self, tag: str, images: Sequence[Any], captions: Sequence[str], step: int) -> None: ...

    def close(self) -> None: ...


def trackers_for(report_to: str) -> list[str]:
    """The tracker names ``--report_to`` asks for; "all" means every one that is installed.

    (TrainConfig.validate already refused a named tracker whose package is missing.)
    """
    if report_to == "none":
        return []
    if report_to == "all":
        return [name for name in TRACKERS if importlib.util.find_spec(name) is not None]
    return [report_to]


def resolve_logging_dir(config: TrainConfig, output_dir: Path) -> Path:
    logging_dir = Path(config.logging_dir).expanduser()
    return logging_dir if logging_dir.is_absolute() else output_dir / logging_dir


class TensorBoardTracker:
    """Event files read by TensorBoard (torch's SummaryWriter, which needs the tensorboard package)."""

    def __init__(self, logging_dir: Path, purge_step: Optional[int]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the events an interrupted run logged after its checkpoint.
        self.writer = SummaryWriter(log_dir=str(logging_dir), purge_step=purge_step, flush_secs=30)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_images(self, tag: str, images: Sequence[Any], captions: Sequence[str], step: int) -> None:
        batch = np.stack([np.asarray(image.convert("RGB")) for image in images])
        self.writer.add_images(tag, batch, step, dataformats="NHWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class VisualDLTracker:
    """VisualDL's LogWriter (ppdiffusers' default tracker)."""

    def __init__(self, logging_dir: Path) -> None:
        from visualdl import LogWriter

        self.writer = LogWriter(logdir=str(logging_dir / "visualdl"))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag=tag, step=step, value=value)

    def log_images(self, tag: str, images: Sequence[Any], captions: Sequence[str], step: int) -> None:
        for index, image in enumerate(images):
            self.writer.add_image(tag=f"{tag}/{index}", img=np.asarray(image.convert("RGB")), step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run named after the output_dir, its local files under the logging dir."""

    def __init__(self, logging_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        logging_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project="textinv", name=run_name, dir=str(logging_dir), config=config)
        except Exception as error:  # no API key, no network...: the user's to fix
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(
                f"--report_to wandb: wandb could not start ({first_line}); run `wandb login`, "
                "set WANDB_MODE=offline, or use --report_to tensorboard"
            ) from None

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_images(self, tag: str, images: Sequence[Any], captions: Sequence[str], step: int) -> None:
        self.run.log(
            {tag: [self.wandb.Image(image, caption=caption) for image, caption in zip(images, captions)]}, step=step
        )

    def close(self) -> None:
        self.run.finish()


class TrainingLogs(TrainObserver):
    """Sends each step's numbers and each validation round's images to the chosen trackers (main process)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.names = trackers_for(config.report_to)
        self.trackers: list[Tracker] = []
        self.logging_dir: Optional[Path] = None
        self.enabled = bool(self.names)
        self._run: Optional[RunContext] = None

    def on_start(self, run: RunContext) -> None:
        self.enabled = self.enabled and run.is_main_process
        if not self.enabled:
            return
        self._run = run
        self.logging_dir = resolve_logging_dir(self.config, run.output_dir)
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        if self.config.resume_from_checkpoint is None:
            self._remove_old_event_files(run.output_dir)
        if self.logging_dir.is_relative_to(run.output_dir):
            add_outputs(run, [self.logging_dir])
        run.record["logging"] = {"report_to": self.names, "logging_dir": str(self.logging_dir)}
        # Said here, before the progress bar starts (the trackers open at the first step).
        logger.info("logging to %s (%s)", self.logging_dir, ", ".join(self.names))
        atexit.register(self.close)  # an interrupted or failed run still flushes what it logged

    def on_step(self, run: RunContext, state: StepState) -> None:
        if not self.enabled:
            return
        if not self.trackers:  # at the first step: a resumed run knows where it starts only now
            self.trackers = self._open_trackers(
                run, purge_step=state.step if self.config.resume_from_checkpoint else None
            )
        norms = run.trainable.vectors.detach().float().norm(dim=1).cpu().tolist()
        values = {
            "train/loss": state.loss,
            "train/learning_rate": state.lr,
            "train/step_seconds": state.step_seconds,
            **{f"train/vector_norm/{index}": norm for index, norm in enumerate(norms)},
        }
        if state.eval_loss is not None:
            values["train/eval_loss"] = state.eval_loss  # beside train/loss (issue 20)
        for tracker in self.trackers:
            tracker.log_scalars(values, state.step)

    def log_images(
        self, step: int, prompt_index: int, prompt: str, images: Sequence[Any], seeds: Sequence[int]
    ) -> None:
        """Validation's image sink: one entry per prompt and round."""
        if not self.enabled:
            return
        captions = [f"{prompt} (seed {seed})" for seed in seeds]
        for tracker in self.trackers:
            tracker.log_images(f"validation/prompt{prompt_index}", images, captions, step)

    def on_end(self, run: RunContext, result: TrainResult) -> None:
        self.close()
        atexit.unregister(self.close)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()

    def _open_trackers(self, run: RunContext, purge_step: Optional[int]) -> list[Tracker]:
        assert self.logging_dir is not None
        trackers: list[Tracker] = []
        for name in self.names:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(self.logging_dir, purge_step))
            elif name == "visualdl":
                trackers.append(VisualDLTracker(self.logging_dir))
            elif name == "wandb":
                trackers.append(WandbTracker(self.logging_dir, run.output_dir.name, run.record.get("config", {})))
        return trackers

    def _remove_old_event_files(self, output_dir: Path) -> None:
        """A fresh run in a used output_dir (--overwrite_output_dir) starts its curves afresh.

        Only inside output_dir: a logging dir elsewhere may be shared by several runs.
        """
        assert self.logging_dir is not None
        if not self.logging_dir.is_relative_to(output_dir):
            return
        for old in self.logging_dir.glob("events.out.tfevents.*"):
            old.unlink()
