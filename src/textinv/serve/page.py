"""The Gradio page of ``textinv serve``: a thin layer over :class:`textinv.serve.state.ServerState`.

Every handler calls one ServerState method and shows its result, or its failure as one line; Gradio
is imported inside the functions, so importing this module does not load it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from textinv.optimizer_options import OPTIMIZER_DEFAULTS, OPTIMIZERS
from textinv.serve.captions import CAPTION_SUFFIXES
from textinv.serve.errors import render_error
from textinv.serve.jobs import TrainRequest
from textinv.serve.state import EXPORT_FORMATS, GenerateRequest, LoadedEmbedding, ServerState
from textinv.serve.words import words_text

DOWNLOAD_HEIGHT = 90  # pixels: the download box with one file
DOWNLOAD_ROW = 56  # pixels: each further file's row


def _guard(action: Callable[[], tuple[Any, ...]], outputs: int) -> tuple[Any, ...]:
    """Run a page action; any failure becomes one line in the message box and the other outputs stay."""
    import gradio as gr

    try:
        return action()
    except Exception as error:
        return (render_error(error),) + tuple(gr.skip() for _ in range(outputs - 1))


def _uploads(files: Any) -> list[tuple[str, str]]:
    """Gradio's uploaded paths; the browser's file name is the last part of each (a name, never a path to use)."""
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files or [])
    return [(str(path), Path(str(path)).name) for path in paths]


def build_app(state: ServerState) -> Any:
    """The Gradio page: every handler calls one ServerState method and shows its result or its error line."""
    import gradio as gr
    import pandas as pd

    def start(files: Any, captions: str, prop: str, placeholder: str, initializer: str, model: str, steps: Any,
              lr: Any, vprompt: str, vsteps: Any, vsampling: Any, seed: Any, lora_rank: Any, optimizer: Any,
              keep_norm: Any) -> str:  # fmt: skip
        def action() -> tuple[Any, ...]:
            request = TrainRequest(
                images=_uploads(files),
                placeholder_token=placeholder or "",
                initializer_token=initializer or "",
                learnable_property=prop or "object",
                model=model or "",
                max_train_steps=int(steps or 0),
                learning_rate=float(lr or 0),
                validation_prompt=vprompt or "",
                validation_steps=int(vsteps or 0),
                validation_num_inference_steps=int(vsampling or 25),
                seed=int(seed or 0),
                lora_rank=int(lora_rank or 0),
                optimizer=optimizer or "adamw",
                preserve_embedding_norm=bool(keep_norm),
                captions=captions or "",
            )
            job = state.start(request)
            captioned = f" ({job.num_captions} with a caption)" if job.num_captions else ""
            words = f" for {words_text(job.words, job.word_images)}" if job.words else ""
            return (
                f"started {job.job_id}: {job.num_images} image(s){captioned}{words}, {request.max_train_steps} steps",
            )

        return _guard(action, 1)[0]  # one output: Gradio takes the value itself, not a tuple

    def stop() -> str:
        return _guard(
            lambda: (f"{state.stop().job_id}: stopping after the current step, then saving a checkpoint",), 1
        )[0]

    def resume() -> str:
        return _guard(lambda: (f"{state.resume().job_id}: resuming from its latest checkpoint",), 1)[0]

    def poll(seen: Optional[dict[str, Any]]) -> tuple[Any, ...]:
        seen = dict(seen or {})
        snap = state.snapshot()
        if snap is None:
            return "no training yet", gr.skip(), gr.skip(), seen
        # Send the plot and the grid only when they changed: re-sending redraws them every second.
        loss_key = f"{snap.job_id}:{len(snap.losses)}:{len(snap.eval_losses)}"
        plot: Any = gr.skip()
        if seen.get("loss") != loss_key and snap.losses:
            # The training loss of each step and, steadier, eval_loss (the fixed held-out triples) where measured.
            steps = [*range(snap.step - len(snap.losses) + 1, snap.step + 1), *(step for step, _ in snap.eval_losses)]
            values = [*snap.losses, *(value for _, value in snap.eval_losses)]
            curves = ["training loss"] * len(snap.losses) + ["eval_loss"] * len(snap.eval_losses)
            plot = pd.DataFrame({"step": steps, "loss": values, "curve": curves})
            seen["loss"] = loss_key
        grid: Any = gr.skip()
        grid_key = f"{snap.job_id}:{snap.grid_version}"
        if seen.get("grid") != grid_key and snap.grid is not None:
            grid = _read_image(snap.grid)
            seen["grid"] = grid_key
        return snap.progress_line(), plot, grid, seen

    def export(key: str) -> tuple[Any, ...]:
        def action() -> tuple[Any, ...]:
            paths = state.export_all(key)  # one file per word
            # The box grows by a row per further file (up to five; more scroll), so no word's file is out of sight.
            height = DOWNLOAD_HEIGHT + DOWNLOAD_ROW * (min(len(paths), 5) - 1)
            box = gr.update(value=str(paths[0]) if len(paths) == 1 else [str(path) for path in paths], height=height)
            names = ", ".join(path.name for path in paths)
            them = "it" if len(paths) == 1 else "them"
            return f"wrote {names} as {EXPORT_FORMATS[key].label}; download {them} below", box

        return _guard(action, 2)

    def load_file(path: Any) -> tuple[Any, ...]:
        if not path:
            return "using the embedding trained above", None

        def action() -> tuple[Any, ...]:
            loaded = state.load_embedding(path, Path(str(path)).name)
            return f"{loaded.describe()}; put {loaded.tokens[0]} (or {{token}}) in the prompt", loaded

        return _guard(action, 2)

    def generate(prompt: str, model: str, loaded: Optional[LoadedEmbedding], token: str, steps: Any, seed: Any,
                 count: Any) -> tuple[Any, ...]:  # fmt: skip
        def action() -> tuple[Any, ...]:
            outcome = state.generate(
                GenerateRequest(
                    prompt=prompt or "",
                    model=model or "",
                    embedding=loaded,
                    token=token or "",
                    num_images=int(count or 1),
                    num_inference_steps=int(steps or 25),
                    seed=int(seed or 0),
                )
            )
            return outcome.message, outcome.images

        return _guard(action, 2)

    with gr.Blocks(title="textinv", analytics_enabled=False) as app:
        gr.Markdown(
            "# textinv\nTeach Stable Diffusion a new word from 3-5 images: train it here, watch it learn, "
            "download it in the format your tool reads, and generate with it."
        )
        gr.Markdown("## 1 · Train")
        with gr.Row():
            with gr.Column():
                files = gr.File(
                    label="Training images (3-5 a word; PNG, JPEG, WebP or BMP) and their caption files (optional)",
                    file_count="multiple",
                    file_types=["image", *CAPTION_SUFFIXES],
                    type="filepath",
                    elem_id="train-images",
                )
                captions = gr.Textbox(
                    label="Captions (optional)",
                    placeholder="cat1.png: a toy on a red sofa\ncat2: {} in the garden",
                    info="one line per image, 'file name: caption' (with or without the extension); wins over a "
                    "caption file of the same name (cat1.txt or cat1.caption, uploaded above); [name] or {} marks "
                    "where the token goes, else the caption follows 'a photo of a <token>, ...'",
                    lines=3,
                    max_length=state.limits.max_images * (state.limits.max_caption_bytes + 100),
                    elem_id="captions",
                )
                prop = gr.Radio(
                    ["object", "style"], value="object", label="What it learns", elem_id="learnable-property"
                )
                placeholder = gr.Textbox(
                    label="Placeholder token",
                    placeholder="<cat-toy>",
                    info="the new word; several at once: separate them with spaces or commas (<cat-toy> <my-style>) "
                    "and start each image's file name with its word, without the brackets (cat-toy-1.jpg, "
                    "my-style_02.png); a caption file goes with its image",
                    elem_id="placeholder-token",
                )
                initializer = gr.Textbox(
                    label="Initializer word",
                    placeholder="toy",
                    info="one word close to it (several words: one each, in the same order, or one for all)",
                    elem_id="initializer-token",
                )
            with gr.Column():
                model = gr.Textbox(
                    label="Model folder",
                    placeholder="empty: the tiny demo model",
                    info="a local diffusers pipeline folder (with model_index.json)",
                    elem_id="model-folder",
                )
                steps = gr.Number(label="Steps", value=200, precision=0, minimum=1, elem_id="steps")
                optimizer = gr.Dropdown(
                    list(OPTIMIZERS),
                    value=TrainRequest.optimizer,
                    label="Optimizer",
                    info="all but adamw need their package (pip install 'textinv[optimizers]')",
                    elem_id="optimizer",
                )
                lr = gr.Number(
                    label="Learning rate",
                    value=TrainRequest.learning_rate,
                    minimum=0,
                    step=1e-4,
                    info="picking an optimizer puts its default here",
                    elem_id="learning-rate",
                )
                keep_norm = gr.Checkbox(
                    label="Keep the word's norm (the median of the vocabulary's) after every step",
                    value=TrainRequest.preserve_embedding_norm,
                    elem_id="preserve-embedding-norm",
                )
                with gr.Accordion("Validation images and seed", open=False):
                    vprompt = gr.Textbox(
                        label="Validation prompt",
                        value="a photo of {token}",
                        info="{token} is your placeholder (several words: one prompt each); empty: no validation "
                        "images",
                        elem_id="validation-prompt",
                    )
                    vsteps = gr.Number(
                        label="Validation every N steps (0: five times a run)",
                        value=0,
                        precision=0,
                        minimum=0,
                        elem_id="validation-steps",
                    )
                    vsampling = gr.Number(
                        label="Validation sampling steps",
                        value=25,
                        precision=0,
                        minimum=1,
                        elem_id="validation-sampling-steps",
                    )
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                lora_rank = gr.Number(
                    label="Also train a small LoRA: its rank (0 = the word alone; 4 is a common choice)",
                    value=0,
                    precision=0,
                    minimum=0,
                    elem_id="lora-rank",
                )
        with gr.Row():
            start_button = gr.Button("Start training", variant="primary", elem_id="start")
            stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
            resume_button = gr.Button("Resume", elem_id="resume")
        train_message = gr.Textbox(label="Message", interactive=False, elem_id="train-message")
        progress = gr.Textbox(label="Progress", interactive=False, elem_id="train-progress")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="loss", color="curve", title="Loss", height=320, elem_id="loss-plot")
            grid = gr.Image(
                label="Validation images (a row per round)",
                type="pil",
                format="png",
                interactive=False,
                elem_id="validation-grid",
            )

        gr.Markdown("## 2 · Download the embedding")
        with gr.Row():
            fmt = gr.Dropdown(
                [(f.label, f.key) for f in EXPORT_FORMATS.values()],
                value="diffusers",
                label="Format",
                elem_id="export-format",
            )
            export_button = gr.Button("Write the file", elem_id="export")
        export_message = gr.Textbox(label="Message", interactive=False, elem_id="export-message")
        download = gr.File(
            label="Embedding file (one per word)", interactive=False, height=DOWNLOAD_HEIGHT, elem_id="download"
        )

        gr.Markdown("## 3 · Generate")
        with gr.Row():
            embedding_file = gr.File(
                label="Embedding file (optional; else the word(s) trained above)",
                file_types=[".safetensors", ".pt", ".bin", ".pdparams", ".png"],
                type="filepath",
                elem_id="embedding-file",
            )
            token = gr.Textbox(label="Load it as token (optional)", placeholder="<my-word>", elem_id="embedding-token")
        prompt = gr.Textbox(
            label="Prompt",
            value="a photo of {token}",
            info="{token} is the embedding's word (the words trained together, all of them)",
            elem_id="prompt",
        )
        with gr.Row():
            gen_steps = gr.Number(label="Sampling steps", value=25, precision=0, minimum=1, elem_id="sampling-steps")
            gen_seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="generate-seed")
            count = gr.Number(label="Images", value=2, precision=0, minimum=1, maximum=8, elem_id="num-images")
        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
        generate_message = gr.Textbox(label="Message", interactive=False, elem_id="generate-message")
        gallery = gr.Gallery(
            label="Images", columns=4, height=360, preview=False, object_fit="contain", format="png", elem_id="gallery"
        )

        loaded = gr.State(None)  # this tab's uploaded embedding
        seen = gr.State({})  # what this tab already shows (plot, grid)
        timer = gr.Timer(0.5)  # progress, loss and grid refresh twice a second

        form = [
            files,
            captions,
            prop,
            placeholder,
            initializer,
            model,
            steps,
            lr,
            vprompt,
            vsteps,
            vsampling,
            seed,
            lora_rank,
            optimizer,
            keep_norm,
        ]
        start_button.click(start, form, [train_message])
        optimizer.change(
            lambda name: OPTIMIZER_DEFAULTS.get(name, OPTIMIZER_DEFAULTS["adamw"]).learning_rate, [optimizer], [lr]
        )
        stop_button.click(stop, None, [train_message])
        resume_button.click(resume, None, [train_message])
        timer.tick(poll, [seen], [progress, loss_plot, grid, seen], show_progress="hidden")
        export_button.click(export, [fmt], [export_message, download])
        embedding_file.change(load_file, [embedding_file], [generate_message, loaded])
        generate_button.click(
            generate, [prompt, model, loaded, token, gen_steps, gen_seed, count], [generate_message, gallery]
        )
    return app


def _read_image(path: Path) -> Any:
    """A copy of an image file in memory (the grid is rewritten in place while training)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.copy()
