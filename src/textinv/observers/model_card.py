"""The model card: output_dir/README.md, with the Hub's YAML metadata and how to use the embedding.

The metadata keys are the Hub's model-card fields (``base_model``, ``license``, ``tags``,
``library_name``) plus ``token``, ``property`` and ``steps`` for people and tools that look for them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

from textinv.config import TrainConfig
from textinv.events import EMBEDDING_FILE, RunContext, TrainObserver, TrainResult, add_outputs
from textinv.files import atomic_write_text

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
GRID_PATH = "validation/progress.png"
TAGS = ("textual-inversion", "stable-diffusion", "text-to-image", "diffusers")
# Hub cache folders are named models--ORG--NAME/snapshots/REVISION.
_HUB_CACHE = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots")


def base_model_id(name_or_path: str) -> Optional[str]:
    """The Hub id of the base model, or None for a local folder the Hub cannot link to.

    (The Hub refuses a card whose base_model is not a repository id, so a local path is left out.)
    """
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path
    cached = _HUB_CACHE.search(str(path.resolve()))
    return f"{cached.group(1)}/{cached.group(2)}" if cached else None


def base_model_license(model_dir: Optional[str]) -> Optional[str]:
    """The license in the base model's own card, if it has one."""
    if not model_dir:
        return None
    card = Path(model_dir) / CARD_FILE
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.license
    except Exception:  # a malformed card: fall back to "other", never fail the run for it
        return None


def a1111_word(token: str) -> str:
    """The word AUTOMATIC1111 users type: it is the embedding's file name, so no <, >, / ..."""
    return re.sub(r"[^\w.-]+", "-", token).strip("-.") or "embedding"


def render_model_card(
    config: TrainConfig,
    record: dict[str, Any],
    output_dir: Path,
    repo_id: Optional[str] = None,
) -> str:
    """The card's text. ``repo_id``: where users load the embedding from (default: output_dir)."""
    from huggingface_hub import ModelCardData

    words = record.get("concepts") or []  # --concepts: several words, each its own file
    files = [(w["placeholder_token"], f"learned_embeds-{w['name']}.safetensors") for w in words]
    files = files or [(config.placeholder_token, EMBEDDING_FILE)]
    token = ", ".join(f"{word}" for word, _ in files)
    base = base_model_id(config.pretrained_model_name_or_path)
    license_name = base_model_license(record.get("model", {}).get("source")) or "other"
    steps = int(record.get("steps_done") or record.get("max_train_steps") or 0)
    metadata = ModelCardData(
        base_model=base,
        license=license_name,
        library_name="diffusers",
        tags=list(TAGS),
        token=token,
        property=config.learnable_property,
        steps=steps,
        num_vectors=config.num_vectors,
    )
    where = repo_id or str(output_dir)
    base_shown = base or config.pretrained_model_name_or_path
    images = record.get("identity", {}).get("images")
    num_images = f"{len(images)} image(s)" if isinstance(images, list) else "cached latents"
    losses = ""
    if "final_loss" in record:
        # One meaning of "best" everywhere: the lowest held-out eval_loss (and its file), as the closing line says.
        held_out = record.get("eval") or {}
        lowest = (
            f"; lowest eval_loss {held_out['best_loss']:.5f} at step {held_out['best_step']} ({held_out['best_file']})"
            if held_out.get("best_step") is not None
            else ""
        )
        losses = f" (final training loss {record['final_loss']:.4f}{lowest})"
    first = files[0][0]
    prompt = f"a photo of {first}" if config.learnable_property == "object" else f"a painting in the style of {first}"
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# Textual Inversion: {', '.join(f'`{word}`' for word, _ in files)}",
        "",
        f"A learned word for [{base_shown}]({_hub_url(base)})" if base else f"A learned word for `{base_shown}`",
        f"(an {config.learnable_property}, {config.num_vectors} vector(s)), trained with textinv on {num_images}",
        f"for {steps} steps{losses}. Only the embedding of `{token}` was trained; the model is unchanged.",
        "",
        *_words_table(words),
    ]
    if config.validation_prompt and (output_dir / GRID_PATH).is_file():
        prompts = "; ".join(f"`{p}`" for p in config.validation_prompt)
        lines += [
            "## Validation images while training",
            "",
            f"![validation images during training]({GRID_PATH})",
            "",
            f"Rows are training steps, columns seeds (the same at every step). Prompts: {prompts}.",
            "",
        ]
    lines += [
        "## Use it with diffusers",
        "",
        "```python",
        *_diffusers_usage(record.get("model", {}).get("family", "sd1"), base_shown, where, files, repo_id),
        f'image = pipe("{prompt}", num_inference_steps=50).images[0]',
        "```",
        "",
        "## Use it in the AUTOMATIC1111 web UI",
        "",
        *[
            f"Copy `{file}` into `stable-diffusion-webui/embeddings/` as `{a1111_word(word)}.safetensors`;"
            for word, file in files
        ],
        f"the file name is the word to type, e.g. `{prompt.replace(files[0][0], a1111_word(files[0][0]))}`.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{config.pretrained_model_name_or_path}` |",
        *([f"| placeholder / initializer | `{token}` / `{config.initializer_token}` |"] if not words else []),
        f"| resolution | {config.image_width}x{config.image_height} |",
        f"| steps | {steps} |",
        f"| batch x accumulation x processes | {config.train_batch_size} x {config.gradient_accumulation_steps} x {record.get('num_processes', 1)} |",
        *_optimizer_rows(config, record),
        f"| seed | {record.get('seed', config.seed)} |",
        f"| textinv | {record.get('versions', {}).get('textinv', '?')} |",
        "",
        "`run.json` holds every setting, the library versions and the timings.",
        "",
    ]
    if license_name == "other":
        lines += ["The embedding follows the license of its base model.", ""]
    return "\n".join(lines)


def _optimizer_rows(config: Any, record: dict[str, Any]) -> list[str]:
    """The optimizer, its rate and schedule, and the norm rule (issue 27), as run.json records them."""
    settings = record.get("optimizer") or config.optimizer_settings
    rate = record.get("effective_learning_rate", config.resolved_learning_rate)
    rows = [
        f"| optimizer | {settings['name']} |",
        f"| learning rate | {rate:.3g} ({settings.get('lr_scheduler', config.lr_scheduler)}) |",
    ]
    norm = record.get("embedding_norm", config.embedding_norm_settings)
    if norm is not None:
        rule = "held at" if norm["rule"] == "preserve" else f"at most {norm['multiple']:g} x"
        rows.append(f"| vector norm | {rule} its text encoder's median vocabulary-row norm, after every step |")
    return rows


def _words_table(words: list[dict[str, Any]]) -> list[str]:
    """With several words (--concepts): each one's start, images, file, best step and stop."""
    if not words:
        return []
    rows = ["## The words", "", "| word | initializer | kind | vectors | images | file | lowest eval_loss | stopped |"]
    rows.append("|---|---|---|---|---|---|---|---|")
    for word in words:
        best = word.get("eval", {})
        lowest = f"{best['best_loss']:.5f} at step {best['best_step']}" if best.get("best_step") is not None else "-"
        rows.append(
            f"| `{word['placeholder_token']}` | `{word['initializer_token']}` | {word['learnable_property']} | "
            f"{word['num_vectors']} | {word['images']} | `learned_embeds-{word['name']}.safetensors` | {lowest} | "
            f"{'converged at step ' + str(word['stop_step']) if word.get('stop_step') is not None else '-'} |"
        )
    return [*rows, ""]


def _diffusers_usage(
    family_name: str, base_shown: str, where: str, files: list[tuple[str, str]], repo_id: Optional[str]
) -> list[str]:
    """Loading lines for the family (``files``: each word and its file): multi-encoder files hold one tensor per
    encoder role (clip_l, clip_g, t5xxl), each loaded into its encoder; SD3's pipeline has no diffusers loader, so
    textinv's loads it."""
    from textinv.models.families import FAMILIES

    family = FAMILIES.get(family_name, FAMILIES["sd1"])
    pipeline = family.pipeline_class
    if len(files) > 1:  # several words: each file's lines, after one pipeline
        head, *rest = [_diffusers_usage(family_name, base_shown, where, [one], repo_id) for one in files]
        return head + [line for lines in rest for line in lines[lines.index("") + 2 :]]
    token, file = files[0]
    if not family.multi_encoder:
        arguments = f'"{where}")  # reads {file}' if file == EMBEDDING_FILE else f'"{where}", weight_name="{file}")'
        return [
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{base_shown}")',
            f"pipe.load_textual_inversion({arguments}",
        ]
    if repo_id:
        file_line = f'hf_hub_download("{repo_id}", "{file}")'
        imports = ["from huggingface_hub import hf_hub_download"]
    else:
        file_line, imports = f'"{Path(where) / file}"', []
    if not family.diffusers_loader:
        return [
            f"from diffusers import {pipeline}",
            *imports,
            "from textinv import load_embeddings  # diffusers has no textual-inversion loader for this pipeline",
            "",
            f'pipe = {pipeline}.from_pretrained("{base_shown}")',
            f"load_embeddings(pipe, {file_line})  # every encoder the file has vectors for",
        ]
    loads = [
        f'pipe.load_textual_inversion(state["{encoder.role}"], token="{token}", '
        f"text_encoder=pipe.{encoder.slot}, tokenizer=pipe.{encoder.tokenizer_slot})"
        for encoder in family.encoders
    ]
    return [
        f"from diffusers import {pipeline}",
        *imports,
        "from safetensors.torch import load_file",
        "",
        f'pipe = {pipeline}.from_pretrained("{base_shown}")',
        f"state = load_file({file_line})",
        "# one tensor per text encoder; a run that trained only some of them has only those keys",
        *loads,
    ]


def write_model_card(run: RunContext, repo_id: Optional[str] = None) -> Path:
    """Write output_dir/README.md (atomically) and list it in run.json."""
    path = atomic_write_text(
        run.output_dir / CARD_FILE, render_model_card(run.config, run.record, run.output_dir, repo_id)
    )
    add_outputs(run, [path], persist=True)
    logger.debug("wrote the model card %s", path)  # debug: after the bar, the run's summary is the one line
    return path


def _hub_url(repo_id: Optional[str]) -> str:
    return f"https://huggingface.co/{repo_id}"


class ModelCard(TrainObserver):
    """Writes the model card when training completes (main process)."""

    def on_end(self, run: RunContext, result: TrainResult) -> None:
        if run.is_main_process:
            write_model_card(run, repo_id=run.config.hub_model_id if run.config.push_to_hub else None)
