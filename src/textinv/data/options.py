"""The training-data options (issue 17): captions, tag handling, aspect-ratio buckets, masks, latent sampling.

A mixin of :class:`textinv.config.TrainConfig` (keyword-only fields, so TrainConfig keeps its positional
order); like config.py it must not import torch. Flag names and defaults are kohya-ss sd-scripts'
(``--caption_extension``, ``--shuffle_caption``, ``--keep_tokens``, ``--caption_tag_dropout_rate``,
``--caption_dropout_rate``, ``--enable_bucket``, ``--min_bucket_reso 256``, ``--max_bucket_reso 1024``,
``--bucket_reso_steps 64``, ``--alpha_mask``) and the AUTOMATIC1111 web UI's (template files with
``[name]`` / ``[filewords]``, ``--latent_sampling`` random / deterministic).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from textinv.errors import UserError, check_at_least
from textinv.fields import option
from textinv.text_files import read_user_text

LATENT_SAMPLINGS = ("random", "deterministic")
NAME_MARK, FILEWORDS_MARK = "[name]", "[filewords]"  # A1111's template fields


def _option(default: Any, help: str, choices: Optional[tuple[str, ...]] = None) -> Any:
    return option(default, help=help, choices=choices, kw_only=True)  # keyword-only: TrainConfig's order stays


@dataclass
class DataOptions:
    # --- several words in one run (issue 27; textinv.data.concepts) ---------------------------------
    concepts: Optional[str] = _option(
        None,
        "a TOML file with one [[concept]] table per word (placeholder_token, initializer_token, num_vectors, "
        "train_data_dir, learnable_property, the caption options, repeats): one model load, one run, each word its "
        "own files learned_embeds-<name>.*; the flags given are every concept's defaults",
    )
    # --- captions ------------------------------------------------------------------------------
    caption_extension: Optional[str] = _option(
        None,
        "read each image's caption from the file beside it with this extension (e.g. .txt or .caption); the placeholder "
        "goes where the caption writes [name], {} or the token itself, else the caption follows a template: "
        "'a photo of <tok>, CAPTION'",
    )
    template_file: Optional[str] = _option(
        None,
        "A1111 template file: one prompt template a line, [name] = the placeholder, [filewords] = the image's caption "
        "(its caption file, else its file name without leading numbers)",
    )
    shuffle_caption: bool = _option(False, "shuffle a caption's comma-separated tags for each example")
    keep_tokens: int = _option(0, "with --shuffle_caption / tag dropout, the first N tags stay in place and are kept")
    caption_tag_dropout_rate: float = _option(
        0.0, "drop each tag (but the kept ones and the placeholder's) with this probability"
    )
    caption_dropout_rate: float = _option(
        0.0, "give this share of examples an empty caption (the template and the placeholder stay)"
    )
    # --- aspect-ratio buckets --------------------------------------------------------------------
    enable_bucket: bool = _option(
        False,
        "aspect-ratio buckets: resize each image, uncropped, to the bucket of its aspect ratio at about "
        "resolution^2 pixels; each batch comes from one bucket",
    )
    min_bucket_reso: int = _option(256, "smallest bucket side in pixels (with --enable_bucket)")
    max_bucket_reso: int = _option(1024, "largest bucket side in pixels (with --enable_bucket)")
    bucket_reso_steps: int = _option(64, "bucket sides are multiples of this many pixels (with --enable_bucket)")
    # --- masks and loss weights ------------------------------------------------------------------
    alpha_mask: bool = _option(False, "weight the loss per pixel by each PNG's alpha channel (0 = ignored)")
    mask_dir: Optional[str] = _option(
        None, "folder of mask images named as the training images (white = trained, black = ignored)"
    )
    latent_sampling: str = _option(
        "random",
        "latents of a view: random = a new sample of the VAE's distribution each step, deterministic = its mean",
        LATENT_SAMPLINGS,
    )

    def validate_data_options(self, resolution_height: int, resolution_width: int) -> None:
        """Raise UserError on the first bad data option (file contents are checked when read)."""
        if self.caption_extension is not None:
            extension = self.caption_extension.strip()
            if not extension or extension == ".":
                raise UserError("--caption_extension is empty; give the caption files' extension, e.g. .txt")
            if "/" in extension or "\\" in extension:
                raise UserError(f"--caption_extension {extension!r} is a path; give an extension such as .txt")
            self.caption_extension = extension if extension.startswith(".") else "." + extension
        if self.template_file is not None:
            read_template_file(self.template_file)
        check_at_least("--keep_tokens", self.keep_tokens, 0)
        for name, rate in (
            ("--caption_tag_dropout_rate", self.caption_tag_dropout_rate),
            ("--caption_dropout_rate", self.caption_dropout_rate),
        ):
            if not 0.0 <= rate <= 1.0:
                raise UserError(f"{name} {rate} must be in [0, 1], e.g. 0.1")
        tag_flags = [
            name
            for name, on in (
                ("--shuffle_caption", self.shuffle_caption),
                ("--keep_tokens", self.keep_tokens > 0),
                ("--caption_tag_dropout_rate", self.caption_tag_dropout_rate > 0),
                ("--caption_dropout_rate", self.caption_dropout_rate > 0),
            )
            if on
        ]
        if tag_flags and self.caption_extension is None and self.template_file is None:
            raise UserError(
                f"{tag_flags[0]} works on per-image captions, and none are read; give --caption_extension .txt "
                "(captions beside the images) or --template_file FILE"
            )
        if self.enable_bucket:
            check_at_least("--bucket_reso_steps", self.bucket_reso_steps, 8)
            if self.bucket_reso_steps % 8:
                raise UserError(
                    f"--bucket_reso_steps {self.bucket_reso_steps} must be a multiple of 8 (the VAE downsamples by 8), e.g. 64"
                )
            from textinv.data.buckets import bucket_sizes

            area = resolution_height * resolution_width
            fitting = max(self.bucket_reso_steps, math.isqrt(area) // self.bucket_reso_steps * self.bucket_reso_steps)
            if not bucket_sizes(area, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps):
                raise UserError(
                    f"--min_bucket_reso {self.min_bucket_reso} .. --max_bucket_reso {self.max_bucket_reso} in steps of "
                    f"{self.bucket_reso_steps} holds no bucket of about {resolution_width}x{resolution_height} pixels; "
                    f"give --min_bucket_reso {fitting} or less (and --max_bucket_reso at least {fitting}), or a larger --resolution"
                )
        if self.alpha_mask and self.mask_dir is not None:
            raise UserError("--alpha_mask and --mask_dir both give a mask; choose one")
        if self.mask_dir is not None:
            folder = Path(self.mask_dir).expanduser()
            if not folder.is_dir():
                raise UserError(
                    f"--mask_dir {self.mask_dir!r} is not a folder; give the folder of masks named as the training images"
                )

    def data_features(self) -> Optional[dict[str, Any]]:
        """The data options in force, for run.json and the run identity; None when every one is off
        (a run as before issue 17)."""
        # --concepts is not one: the run identity holds each word's own (textinv.training.concepts).
        values = {
            spec.name: getattr(self, spec.name) for spec in dataclasses.fields(DataOptions) if spec.name != "concepts"
        }
        defaults = {spec.name: spec.default for spec in dataclasses.fields(DataOptions) if spec.name != "concepts"}
        if values == defaults:
            return None
        if not self.enable_bucket:
            for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
                values.pop(name)
        return values


def data_option_names() -> set[str]:
    return {spec.name for spec in dataclasses.fields(DataOptions)}


def read_template_file(path: str) -> tuple[str, ...]:
    """The templates of an A1111 template file: one a line, blank lines skipped; every one must hold [name]."""
    text = read_user_text(path, "--template_file", "a text file of templates, one a line")
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise UserError(f"--template_file {path!r} is empty; write one template a line, e.g. 'a photo of [name]'")
    for number, line in lines:
        if NAME_MARK not in line:
            raise UserError(
                f"--template_file {path!r} line {number} ({line!r}) has no [name]: every template needs the placeholder, "
                "e.g. 'a photo of [name], [filewords]'"
            )
    return tuple(line for _, line in lines)
