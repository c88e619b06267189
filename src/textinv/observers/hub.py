"""``--push_to_hub``: upload output_dir to a Hugging Face Hub model repository after training.

The token is looked up before training starts (``--hub_token``, else huggingface_hub's own lookup:
``HF_TOKEN`` or the token saved by ``hf auth login``) so a missing one costs no training time.
The endpoint is huggingface_hub's (``HF_ENDPOINT`` to use another server). A failed upload is one
line; output_dir is left exactly as training wrote it, ready for ``hf upload``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from textinv.config import TrainConfig, UserError
from textinv.events import RUN_FILE, RunContext, TrainObserver, TrainResult
from textinv.files import atomic_write_json

logger = logging.getLogger(__name__)

# Resumable checkpoints (optimizer and RNG state) and temporary files stay local.
IGNORE_PATTERNS = ["checkpoint-*", ".*", "*/.*"]


@dataclass
class PushResult:
    repo_id: str
    url: str
    commit_url: str


def hub_endpoint() -> Optional[str]:
    """``HF_ENDPOINT`` read now (huggingface_hub reads it once, at import)."""
    endpoint = os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def resolve_token(explicit: Optional[str]) -> str:
    """The token to push with, or a UserError saying how to give one."""
    from huggingface_hub import get_token

    token = explicit or get_token()
    if not token:
        raise UserError(
            "--push_to_hub needs a Hugging Face token: pass --hub_token, set HF_TOKEN, or run `hf auth login` "
            "(a token with write access)"
        )
    return token


def _check_online() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise UserError("--push_to_hub cannot upload while HF_HUB_OFFLINE is set; unset it, or drop --push_to_hub")


def push_folder(
    folder: Path,
    repo_id: str,
    token: str,
    endpoint: Optional[str] = None,
    before_upload: Optional[Callable[[str], object]] = None,
) -> PushResult:
    """Create the model repository if needed and upload ``folder`` as one commit.

    ``before_upload(full_repo_id)`` runs between the two (the model card names the repository).
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint or hub_endpoint(), token=token)
    try:
        repo = api.create_repo(repo_id, repo_type="model", exist_ok=True)
    except Exception as error:  # network, refused token, server error: all one line for the user
        raise _push_failed(folder, repo_id, api.endpoint, error) from None
    if before_upload is not None:
        before_upload(repo.repo_id)
    try:
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            repo_type="model",
            commit_message="Upload textual inversion embedding (textinv)",
            ignore_patterns=IGNORE_PATTERNS,
        )
    except Exception as error:
        raise _push_failed(folder, repo.repo_id, api.endpoint, error) from None
    return PushResult(repo_id=repo.repo_id, url=str(repo), commit_url=str(commit))


def _push_failed(folder: Path, repo_id: str, endpoint: str, error: BaseException) -> UserError:
    return UserError(
        f"could not push {str(folder)!r} to {repo_id!r} on {endpoint} ({_describe(error)}); "
        f"the results are intact in {str(folder)!r}: check the token and network, then run "
        f"`hf upload {repo_id} {folder} --exclude 'checkpoint-*'`"
    )


def _describe(error: BaseException) -> str:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        return f"HTTP {status}: the token was refused or cannot write there"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class HubPush(TrainObserver):
    """Uploads output_dir after training (main process); the token is checked when it is built."""

    def __init__(self, config: TrainConfig) -> None:
        _check_online()
        self.token = resolve_token(config.hub_token)
        self.repo_id = config.hub_model_id or Path(config.output_dir).expanduser().resolve().name

    def on_end(self, run: RunContext, result: TrainResult) -> None:
        if not run.is_main_process:
            return
        from textinv.observers.model_card import write_model_card

        logger.info("pushing %s to the hub as %s", run.output_dir, self.repo_id)
        # The card's loading line names the full repository ("name" may become "user/name").
        pushed = push_folder(
            run.output_dir, self.repo_id, self.token, before_upload=lambda repo_id: write_model_card(run, repo_id)
        )
        run.record["hub"] = {"repo_id": pushed.repo_id, "url": pushed.url, "commit_url": pushed.commit_url}
        atomic_write_json(run.output_dir / RUN_FILE, run.record)
        logger.info("pushed to %s", pushed.url)
