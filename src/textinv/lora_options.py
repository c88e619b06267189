"""The pivotal-tuning options (issue 26): the word's vectors and a small LoRA of the denoiser, trained together.

A mixin of :class:`textinv.config.TrainConfig` (keyword-only fields, so TrainConfig keeps its positional order);
like config.py it must not import torch. The names are those of diffusers' advanced training scripts
(examples/advanced_diffusion_training: ``--rank``, ``--lora_alpha``, ``--train_text_encoder_ti_frac``) where they
have one. ``--lora_rank 0``, the default, is plain textual inversion, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from textinv.errors import UserError
from textinv.fields import option


def _option(default: Any, help: str) -> Any:
    return option(default, help=help, kw_only=True)  # keyword-only: TrainConfig's order stays


@dataclass
class LoraOptions:
    lora_rank: int = _option(
        0, "also train a LoRA of this rank on the denoiser's attention projections (pivotal tuning); 0 = off"
    )
    # diffusers' scripts default --lora_alpha to the rank (a scale of 1).
    lora_alpha: Optional[float] = _option(None, "LoRA alpha (the update is scaled by alpha / rank); default: the rank")
    # 1e-4: diffusers' advanced scripts' --learning_rate for the LoRA (the embedding has its own, --learning_rate).
    lora_learning_rate: Optional[float] = _option(None, "learning rate of the LoRA (default 1e-4)")
    # diffusers' --train_text_encoder_ti_frac (default 0.5 there; 1.0 here keeps the word learning to the end).
    embedding_train_frac: Optional[float] = _option(
        None, "share of the steps the word's vectors train before they freeze while the LoRA goes on (default 1.0)"
    )
    lora_text_encoder: bool = _option(False, "also put LoRA adapters on the text encoders' attention projections")

    @property
    def lora_settings(self) -> Optional[dict[str, Any]]:
        """The LoRA settings in force (for run.json and the run identity), or None without --lora_rank."""
        if not self.lora_rank:
            return None
        return {
            "rank": self.lora_rank,
            "alpha": self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank),
            "learning_rate": self.lora_learning_rate if self.lora_learning_rate is not None else 1e-4,
            "embedding_train_frac": self.embedding_train_frac if self.embedding_train_frac is not None else 1.0,
            "text_encoder": self.lora_text_encoder,
        }

    def validate_lora_options(self) -> None:
        """One-line UserErrors: a negative rank, LoRA options without --lora_rank, values out of range."""
        if self.lora_rank < 0:
            raise UserError(f"--lora_rank {self.lora_rank} must be >= 0 (e.g. 4; 0 = plain textual inversion)")
        given = [
            name
            for name, value in (
                ("--lora_alpha", self.lora_alpha),
                ("--lora_learning_rate", self.lora_learning_rate),
                ("--embedding_train_frac", self.embedding_train_frac),
                ("--lora_text_encoder", self.lora_text_encoder or None),
            )
            if value is not None
        ]
        if given and not self.lora_rank:
            raise UserError(f"{given[0]} needs --lora_rank: add e.g. --lora_rank 4 to train a LoRA with the word")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UserError(f"--lora_alpha {self.lora_alpha} must be > 0, e.g. {self.lora_rank or 4}")
        if self.lora_learning_rate is not None and not self.lora_learning_rate > 0:
            raise UserError(f"--lora_learning_rate {self.lora_learning_rate} must be > 0, e.g. 1e-4")
        if self.embedding_train_frac is not None and not 0.0 < self.embedding_train_frac <= 1.0:
            raise UserError(f"--embedding_train_frac {self.embedding_train_frac} must be in (0, 1], e.g. 0.5")
