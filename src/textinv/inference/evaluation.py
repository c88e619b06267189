"""How good is a learned word? The two CLIP scores of the Textual Inversion paper.

Gal et al., "An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual
Inversion" (ICLR 2023, arXiv:2208.01618), section 5, measure:

* image similarity (reconstruction): the mean pairwise CLIP-space cosine similarity between images
  generated from "A photo of S*" and the concept's training images;
* text similarity (editability): for prompts that put S* in a new setting, the mean CLIP-space
  cosine similarity between each generated image and the prompt's text with S* left out.

The paper samples 64 images per prompt with 50 DDIM steps; ``num_images`` and
``num_inference_steps`` choose here. Any CLIP model folder or hub id works (a transformers
``CLIPModel`` with its image processor and tokenizer); the paper used OpenAI's ViT-B/32.

torch is imported where it is used, so that the CLI's parser can read this module's defaults cheaply.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from textinv.config import UserError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
# The paper's prompt for image similarity; "{}" is where the learned word goes.
IMAGE_PROMPT = "a photo of {}"
# Edit prompts for text similarity. The paper's protocol, with the object prompts of the DreamBooth
# dataset (Ruiz et al., CVPR 2023, google/dreambooth dataset/prompts_and_classes.txt, CC-BY-4.0)
# with the class noun dropped, as is common practice for comparing personalisation methods.
EDIT_PROMPTS = (
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
    "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water",
    "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street",
    "a {} on top of a dirt road",
    "a {} on top of a white rug",
    "a red {}",
    "a purple {}",
    "a shiny {}",
    "a wet {}",
    "a cube shaped {}",
)


@dataclass
class PromptScore:
    prompt: str  # with the learned word
    text: str  # what CLIP compared the images with: the prompt without the word
    text_similarity: float


@dataclass
class EvalResult:
    image_similarity: float
    text_similarity: float
    token: str
    num_images: int
    prompts: list[PromptScore] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ClipScorer:
    """CLIP embeddings of images and texts, and the paper's two similarities over them."""

    def __init__(self, clip_model: str = DEFAULT_CLIP_MODEL, device: Optional[torch.device] = None) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from textinv.models.quiet import quiet_loading

        self.device = device or torch.device("cpu")
        local_only = _cached_only(clip_model)
        try:
            with quiet_loading():
                self.model = CLIPModel.from_pretrained(clip_model, local_files_only=local_only).to(self.device).eval()  # type: ignore[arg-type]
                self.image_processor = AutoImageProcessor.from_pretrained(clip_model, local_files_only=local_only)
                self.tokenizer = AutoTokenizer.from_pretrained(clip_model, local_files_only=local_only)
        except (OSError, ValueError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(
                f"--clip_model {clip_model!r} could not be loaded as a CLIP model ({first}); give a folder "
                f"with a transformers CLIPModel, its image processor and tokenizer{_TRY_TINY_CLIP}"
            ) from None

    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Unit-length CLIP image embeddings, one row per image."""
        import torch

        pixels = self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        with torch.no_grad():
            features = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        return _unit(_pooled(features))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length CLIP text embeddings, one row per text."""
        import torch

        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            features = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
        return _unit(_pooled(features))

    def image_similarity(self, generated: Sequence[Any], references: Sequence[Any]) -> float:
        """Mean cosine similarity over every (generated, reference) pair of images."""
        if not generated or not references:
            raise UserError("image similarity needs at least one generated and one reference image")
        return float((self.embed_images(generated) @ self.embed_images(references).T).mean())

    def text_similarity(self, images: Sequence[Any], text: str) -> float:
        """Mean cosine similarity between each image and one text."""
        return float((self.embed_images(images) @ self.embed_texts([text]).T).mean())


_TRY_TINY_CLIP = " (`textinv tiny --clip DIR` writes a small random-weight one to try eval without a download)"


def _cached_only(clip_model: str) -> bool:
    """Whether a hub CLIP must load from the cache alone; a UserError at once when it cannot load at all.

    transformers retries an unreachable hub for half a minute before it gives up; one request (or
    HF_HUB_OFFLINE=1) tells the same in a second.
    """
    if Path(clip_model).expanduser().is_dir():
        return False
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(clip_model, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        try:
            HfApi().model_info(clip_model, timeout=10)
            return False
        except Exception as error:  # no network, no such repository, no access: the same answer
            why = f"the hub did not answer ({type(error).__name__})"
    if cached:
        return True
    raise UserError(
        f"--clip_model {clip_model!r} is not a folder, {why} and it is not in the local cache; give a CLIP folder{_TRY_TINY_CLIP}"
    )


def _pooled(features: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return features if hasattr(features, "shape") else features.pooler_output


def _unit(features: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.normalize(features.float(), dim=-1)


def text_without_word(prompt: str) -> str:
    """The edit prompt as CLIP reads it: the learned word left out, spaces tidied."""
    return re.sub(r"\s+", " ", prompt.replace("{}", " ")).strip()


def read_prompts(path: str | Path) -> list[str]:
    """Edit prompts from a text file: one a line with "{}" where the word goes; '#' starts a comment."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--prompts {str(path)!r} cannot be read ({error}); give a UTF-8 text file") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1:
            raise UserError(
                f"--prompts {str(path)!r} line {number} ({line!r}) must hold '{{}}' once, where the word goes, "
                "e.g. 'a {} on the beach'"
            )
        prompts.append(line)
    if not prompts:
        raise UserError(f"--prompts {str(path)!r} holds no prompts; write one a line, e.g. 'a {{}} on the beach'")
    return prompts


def load_reference_images(train_data_dir: str | Path) -> list[Any]:
    from PIL import Image

    from textinv.data.images import discover_images

    images = []
    for path in discover_images(str(train_data_dir)):
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def evaluate(
    model: str,
    embeddings: str | Path,
    train_data_dir: str | Path,
    prompts: Optional[Sequence[str]] = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    num_images: int = 8,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 4,
    device: Optional[str] = None,
) -> EvalResult:
    """Generate with the learned word and score the images with CLIP (see the module docstring).

    Image ``i`` of every prompt uses seed ``seed + i``, as ``textinv generate`` does.
    """
    from textinv.embeddings import load_embeddings
    from textinv.inference.generation import load_pipeline, pick_device

    if num_images < 1:
        raise UserError(f"--num_images {num_images} must be >= 1")
    if batch_size < 1:
        raise UserError(f"--batch_size {batch_size} must be >= 1")
    edit_prompts = list(prompts) if prompts is not None else list(EDIT_PROMPTS)
    for prompt in edit_prompts:
        if prompt.count("{}") != 1:
            raise UserError(f"prompt {prompt!r} must hold '{{}}' once, where the word goes, e.g. 'a {{}} on the beach'")
    if not edit_prompts:
        raise UserError("no edit prompts to score; give at least one, e.g. 'a {} on the beach'")
    references = load_reference_images(train_data_dir)  # cheap checks before loading models
    scorer = ClipScorer(clip_model, device=pick_device(device))  # --device for the scoring too, not only generation
    pipe = load_pipeline(model, device=device)
    tokens = load_embeddings(pipe, embeddings)
    if len(tokens) != 1:
        raise UserError(
            f"--embeddings {str(embeddings)!r} holds {len(tokens)} tokens ({', '.join(tokens)}); evaluate a file of one token"
        )
    token = tokens[0]

    def sample(template: str) -> list[Any]:
        from textinv.inference.generation import generate

        images: list[Any] = []
        for first in range(0, num_images, batch_size):
            count = min(batch_size, num_images - first)
            images += generate(
                pipe,
                template.format(token),
                num_images=count,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                seed=seed + first,
            ).images
        return images

    image_score = scorer.image_similarity(sample(IMAGE_PROMPT), references)
    logger.info("image similarity %.4f", image_score)
    scores = []
    for prompt in edit_prompts:
        text = text_without_word(prompt)
        scores.append(PromptScore(prompt.format(token), text, scorer.text_similarity(sample(prompt), text)))
        logger.info("text similarity %.4f  %s", scores[-1].text_similarity, scores[-1].prompt)
    return EvalResult(
        image_similarity=image_score,
        text_similarity=sum(score.text_similarity for score in scores) / len(scores),
        token=token,
        num_images=num_images,
        prompts=scores,
        details={
            "model": str(model),
            "embeddings": str(embeddings),
            "train_data_dir": str(train_data_dir),
            "num_reference_images": len(references),
            "clip_model": str(clip_model),
            "image_prompt": IMAGE_PROMPT.format(token),
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "seed": seed,
        },
    )


def eval_targets(
    model: str, embeddings: str, train_data_dir: Optional[str], concepts_file: Optional[str]
) -> list[tuple[str, Any, str]]:
    """What ``textinv eval`` scores: ``("", embeddings, train_data_dir)``, or with ``--concepts`` every word of the run
    (:func:`concept_targets`)."""
    if concepts_file:
        return concept_targets(model, concepts_file, embeddings)
    if not train_data_dir:
        raise UserError(
            "--train_data_dir is required: the word's training images (or --concepts FILE for a run of several)"
        )
    return [("", embeddings, train_data_dir)]


def concept_targets(model: str, concepts_file: str, run_folder: str | Path) -> list[tuple[str, Path, str]]:
    """Each word of a ``--concepts`` run: its token, its file ``learned_embeds-<name>.safetensors`` in
    ``run_folder`` (the run's output folder) and its training images, for :func:`evaluate` word by word."""
    from textinv.config import TrainConfig
    from textinv.data.concepts import concept_configs, file_names

    # Only the tokens and folders count here: a file that left initializer_token to a training flag reads too.
    words = concept_configs(
        TrainConfig(pretrained_model_name_or_path=model, concepts=concepts_file, initializer_token="unused")
    )
    folder = Path(run_folder).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"--embeddings {str(run_folder)!r}: with --concepts give the run's output folder "
            "(it holds learned_embeds-<name>.safetensors)"
        )
    targets = []
    for word, name in zip(words, file_names(words)):
        file = folder / f"learned_embeds{'-' + name if name else ''}.safetensors"
        if not file.is_file():
            raise UserError(
                f"{file} does not exist: {word.placeholder_token} was not trained into {str(run_folder)!r}; "
                f"train with --concepts {concepts_file} --output_dir {run_folder}"
            )
        targets.append((word.placeholder_token, file, word.train_data_dir))
    return targets
