"""The exceptions the CLI turns into exit codes: a user's mistake (exit 2), a clean stop on a signal.

Imports nothing of textinv (and not torch), so every module can raise them.
"""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file...). The CLI prints it as one line, exit 2."""


def first_line(error: BaseException) -> str:
    """An exception's first line (at most 200 characters), or its type name: what a one-line error quotes."""
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def printable(text: object) -> str:
    """``text`` as a one-line message can quote it: control characters (a newline, a carriage return) as '?'
    (fuzzing found names of one newline or one carriage return breaking one-line errors)."""
    return "".join(char if char.isprintable() else "?" for char in str(text))


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a step, and a checkpoint was written (or before the first step, and
    nothing was: step 0, no checkpoint)."""

    def __init__(self, step: int, max_steps: int, signum: int, checkpoint: Optional[str]) -> None:
        import signal

        self.step, self.max_steps, self.signum, self.checkpoint = step, max_steps, signum, checkpoint
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        if step == 0 and checkpoint is None:
            super().__init__(f"stopped by {signal.Signals(signum).name} before the first step; nothing was written")
            return
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step} of {max_steps}{where}; "
            "run the same command with --resume_from_checkpoint latest to continue"
        )


# The checks TrainConfig.validate() (and other option checks) raise with.
def require_text(name: str, value: Optional[str]) -> None:
    if value is None or not str(value).strip():
        raise UserError(f"{name} is required and must not be empty")


def require_unless_concepts(name: str, value: Optional[str], what: str) -> None:
    """A flag each ``[[concept]]`` of ``--concepts FILE`` can give instead (--train_data_dir, --placeholder_token):
    required without that file, and the message says so."""
    if value is None or not str(value).strip():
        raise UserError(
            f"{name} is required: {what}; or give --concepts FILE, a TOML file of [[concept]] tables that each set "
            f"{name.lstrip('-')}"
        )


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} {value!r} is not one of: {', '.join(choices)}")


def check_at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UserError(f"{name} {value} must be >= {minimum}")
