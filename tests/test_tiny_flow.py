"""The tiny SD3 and Flux.1 pipelines and their offline T5 tokenizer (textinv.models.families.tiny_flow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from textinv.data.templates import OBJECT_TEMPLATES_EN, STYLE_TEMPLATES_EN
from textinv.models.families.tiny_flow import (
    T5_TOKENIZER_README,
    build_tiny_flux,
    build_tiny_sd3,
    save_t5_readme,
    t5_tokenizer,
)
from textinv.models.families.tiny_parts import TINY_ENGLISH_WORDS, TinySpec

BUILDERS = {"sd3": build_tiny_sd3, "flux": build_tiny_flux}
# family -> (pipeline class, denoiser class, T5 encoder slot, T5 tokenizer slot, extra call arguments)
LAYOUT: dict[str, tuple[str, str, str, str, dict[str, Any]]] = {
    "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel", "text_encoder_3", "tokenizer_3", {}),
    "flux": ("FluxPipeline", "FluxTransformer2DModel", "text_encoder_2", "tokenizer_2", {"guidance_scale": 3.5}),
}


def _build(family: str, seed: int, **kwargs: Any) -> Any:
    return BUILDERS[family](TinySpec(), lambda: torch.manual_seed(seed), **kwargs)


def _weights(pipeline: Any) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": tensor
        for name, module in pipeline.components.items()
        if isinstance(module, torch.nn.Module)
        for key, tensor in module.state_dict().items()
    }


def _template_words() -> set[str]:
    text = " ".join(OBJECT_TEMPLATES_EN + STYLE_TEMPLATES_EN + TINY_ENGLISH_WORDS).replace("{}", "")
    return set(text.split())


# --- the T5 tokenizer -------------------------------------------------------------------------------------------


def test_t5_tokenizer_has_t5_special_ids_and_appends_eos() -> None:
    tokenizer = t5_tokenizer()
    assert type(tokenizer).__name__ in ("T5Tokenizer", "T5TokenizerFast")
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a photo of a toy").input_ids
    # Whole words, each starting with SentencePiece's word marker, then the eos the post-processor appends.
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "\u2581a",
        "\u2581photo",
        "\u2581of",
        "\u2581a",
        "\u2581toy",
        "</s>",
    ]
    assert ids[-1] == 1 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a toy"


def test_t5_tokenizer_pads_with_pad_to_max_length() -> None:
    tokenizer = t5_tokenizer()
    encoded = tokenizer("a toy", padding="max_length", max_length=12)
    unpadded = tokenizer("a toy").input_ids
    assert len(encoded.input_ids) == 12
    assert encoded.input_ids[: len(unpadded)] == unpadded
    assert set(encoded.input_ids[len(unpadded) :]) == {0}
    assert encoded.attention_mask == [1] * len(unpadded) + [0] * (12 - len(unpadded))


def test_t5_tokenizer_vocabulary_is_small_and_knows_the_template_words() -> None:
    tokenizer = t5_tokenizer()
    assert 100 <= len(tokenizer) < 1000  # a few hundred entries, nothing like T5's 32100
    for word in sorted(_template_words()):
        pieces = tokenizer.tokenize(word)
        assert pieces == [f"\u2581{word}"], (word, pieces)
    # Unknown ASCII words split into characters, never into <unk>.
    ids = tokenizer("Zebra 42 quux?").input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Zebra 42 quux?"
    # T5's sentinels are the last ids of the vocabulary.
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) == "<extra_id_0>"


def test_t5_tokenizer_saves_and_reloads_with_autotokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = t5_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(tokenizer)
    prompts = ["a photo of a toy", "a cropped painting in the style of Van Gogh!", "xyz 123"]
    for prompt in prompts:
        assert reloaded(prompt).input_ids == tokenizer(prompt).input_ids
    assert reloaded.pad_token_id == 0 and reloaded.eos_token_id == 1


def test_t5_tokenizer_added_token_is_one_piece(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = t5_tokenizer()
    size = len(tokenizer)
    assert tokenizer.add_tokens(["<x>"]) == 1
    new_id = tokenizer.convert_tokens_to_ids("<x>")
    assert new_id == size  # the next id after the vocabulary: what diffusers' loader writes its row at
    ids = tokenizer("a photo of <x>").input_ids
    assert ids.count(new_id) == 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    # ...and stays one piece after a save and reload.
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("a photo of <x>").input_ids == ids


def test_save_t5_readme_writes_beside_the_tokenizer(tmp_path: Path) -> None:
    t5_tokenizer().save_pretrained(tmp_path / "tokenizer_2")
    save_t5_readme(tmp_path, "tokenizer_2")
    readme = (tmp_path / "tokenizer_2" / "README.md").read_text(encoding="utf-8")
    assert readme == T5_TOKENIZER_README
    assert "NOT" in readme.upper() and "T5" in readme


# --- the pipelines ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_same_seed_gives_the_same_weights(family: str) -> None:
    first, again, other = (_weights(_build(family, seed)) for seed in (0, 0, 1))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    # Every part draws from the seed: some tensor of each differs under another seed.
    differing = {key.split(".")[0] for key in first if not torch.equal(first[key], other[key])}
    assert differing == {key.split(".")[0] for key in first}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_parts_fit_together(family: str) -> None:
    pipe = _build(family, 0)
    _, _, t5_slot, t5_tokenizer_slot, _ = LAYOUT[family]
    t5 = getattr(pipe, t5_slot)
    assert t5.config.vocab_size == len(getattr(pipe, t5_tokenizer_slot))
    config = pipe.transformer.config
    assert config.joint_attention_dim == t5.config.d_model
    assert pipe.vae.config.latent_channels == 16
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    if family == "sd3":
        assert (
            config.pooled_projection_dim
            == pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
        )
        # SD3 zero-pads both CLIP sequences, side by side, to T5's width: they must fit.
        assert t5.config.d_model >= pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert pipe.tokenizer_2.pad_token == "!"
        assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    else:
        assert config.in_channels == 4 * pipe.vae.config.latent_channels  # 2x2 packed latents
        assert config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
        assert sum(config.axes_dims_rope) == config.attention_head_dim
        assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
        assert pipe.scheduler.config.use_dynamic_shifting


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_saved_pipeline_loads_and_generates(family: str, tmp_path: Path) -> None:
    import diffusers

    pipeline_class, denoiser_class, t5_slot, t5_tokenizer_slot, call_kwargs = LAYOUT[family]
    _build(family, 0).save_pretrained(tmp_path)
    save_t5_readme(tmp_path, t5_tokenizer_slot)  # a README beside the tokenizer must not disturb loading

    index = json.loads((tmp_path / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == pipeline_class
    assert index["transformer"] == ["diffusers", denoiser_class]
    assert index[t5_slot] == ["transformers", "T5EncoderModel"]
    assert index[t5_tokenizer_slot] == ["transformers", "T5TokenizerFast"]  # as the released models' folders say

    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(pipe).__name__ == pipeline_class
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="np", generator=generator, **call_kwargs)
    images = pipe("a photo of a toy", **kwargs).images
    assert images.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.as_tensor(images)).all()


def test_flux_schnell_transformer_has_no_guidance_input() -> None:
    pipe = _build("flux", 0, guidance_embeds=False)
    assert pipe.transformer.config.guidance_embeds is False
    images = pipe("a toy", height=64, width=64, num_inference_steps=1, output_type="np").images
    assert images.shape == (1, 64, 64, 3)


def test_diffusers_textual_inversion_loader_fills_flux_t5(tmp_path: Path) -> None:
    import diffusers

    _build("flux", 0).save_pretrained(tmp_path)
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    tokenizer, t5 = pipe.tokenizer_2, pipe.text_encoder_2
    size, width = len(tokenizer), t5.config.d_model
    vectors = torch.randn(2, width)

    pipe.load_textual_inversion(vectors, token="<x>", text_encoder=t5, tokenizer=tokenizer)
    ids = tokenizer.convert_tokens_to_ids(["<x>", "<x>_1"])
    assert ids == [size, size + 1]
    rows = t5.get_input_embeddings().weight
    assert rows.shape[0] == size + 2
    assert torch.equal(rows[ids[0]], vectors[0]) and torch.equal(rows[ids[1]], vectors[1])
    # The pipeline spells a two-vector token out before tokenizing, and each word is one token.
    prompt = pipe.maybe_convert_prompt("a photo of <x>", tokenizer)
    assert prompt == "a photo of <x> <x>_1"
    assert [i for i in tokenizer(prompt).input_ids if i >= size] == ids

    # A diffusers-format state dict ({token: vectors}) loads too, after the first.
    pipe.load_textual_inversion({"<y>": torch.randn(1, width)}, text_encoder=t5, tokenizer=tokenizer)
    assert tokenizer.convert_tokens_to_ids("<y>") == size + 2
    images = pipe("a <y> photo of <x>", height=64, width=64, num_inference_steps=1, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
