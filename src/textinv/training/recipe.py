"""The training recipe: :meth:`TrainingRecipe.setup`, then :meth:`~TrainingRecipe.loop`, then
:meth:`~TrainingRecipe.finish`. Read the loop top to bottom; each line calls one named step. Observers
(:class:`textinv.events.TrainObserver`) see the run start, every step and the end; the caller chooses them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from textinv.config import TrainConfig, TrainingInterrupted
from textinv.cpu_threads import thread_count_kept
from textinv.data.latents import LatentCache
from textinv.data.templates import choose_language, templates_for
from textinv.events import RUN_FILE, RunContext, StepState, TrainObserver, TrainResult
from textinv.files import atomic_write_json
from textinv.models import precision
from textinv.models.families import check_text_encoders
from textinv.models.loading import load_model_parts, resolve_model_dir
from textinv.training import builders, checkpoints, concepts, optimizers, run_dir
from textinv.training.export import (
    embedding_file_name,
    embedding_of,
    formats_for_model,
    write_embedding_files,
    write_final_files,
    write_snapshot,
)
from textinv.training.held_out import HeldOutEvaluation
from textinv.training.lora import PivotalModule, add_lora, embedding_frozen_after, freeze_embedding_past
from textinv.training.loss import LossSettings, ObjectiveFor, denoising_loss
from textinv.training.stopping import (
    DIVERGED_HINT,
    TrainingDiverged,
    TrainingOutOfMemory,
    agreed_stop,
    out_of_memory_text,
    setting_up,
    stop_on_signals,
)

logger = logging.getLogger(__name__)


def train(
    config: TrainConfig,
    observers: Sequence[TrainObserver] = (),
    latent_cache: Optional[LatentCache] = None,
) -> TrainResult:
    """Learn the placeholder token's vectors; write them (and checkpoints) to output_dir.

    ``latent_cache`` replaces the images of ``train_data_dir`` with ready-made latents
    (benchmarks that plant a concept use it).
    """
    recipe = TrainingRecipe(config, observers, latent_cache)
    # A signal while the model loads stops at once, writing nothing; the caller's thread count comes back at the end.
    with stop_on_signals(recipe), thread_count_kept():
        with setting_up(recipe, Path(config.output_dir).expanduser()):
            recipe.setup()
        recipe.loop()
    return recipe.finish()


class TrainingRecipe:
    """One training run. ``setup`` loads and checks everything, ``loop`` trains, ``finish`` writes."""

    def __init__(
        self, config: TrainConfig, observers: Sequence[TrainObserver], latent_cache: Optional[LatentCache]
    ) -> None:
        self.config = config
        self.observers = list(observers)
        self.latent_cache = latent_cache
        self.losses, self.saved, self.start_step = [], [], 0  # type: list[float], list[Path], int
        self._run: Optional[RunContext] = None
        self._early_stop: Optional[int] = None  # a signal that came before the run context existed
        self.setting_up = True  # until the first step: a signal then stops at once (training.stopping)
        self.created = time.perf_counter()  # the whole run's time counts from here (loading included)

    @property
    def run(self) -> RunContext:
        assert self._run is not None, "setup() makes the run context"
        return self._run

    @property
    def stop_requested(self) -> Optional[int]:
        return self._run.stop_requested if self._run is not None else self._early_stop

    @stop_requested.setter
    def stop_requested(self, signum: Optional[int]) -> None:
        if self._run is not None:
            self._run.stop_requested = signum
        else:
            self._early_stop = signum

    # --- setup -----------------------------------------------------------------------------------
    def setup(self) -> RunContext:
        from accelerate import Accelerator

        config = self.config
        config.validate()
        output_dir = Path(config.output_dir).expanduser()
        # accelerate never does precision here (fp16's loss scaler is textinv's own, precision.grad_scaler), so its
        # process-wide state is the same for every train() call in a process (a notebook, textinv serve).
        accelerator = Accelerator(cpu=builders.processes_share_cpu(), mixed_precision="no")
        config, precision_text = precision.choose_precision(config, accelerator.device)
        self.config = config
        resume_dir = run_dir.prepare_output_dir(config, output_dir, accelerator)
        device = self.device = accelerator.device

        # Cheap checks first: a missing image folder should not cost a model load. Captions, buckets, masks and
        # starting vectors are read and checked before the model loads too, for every word (--concepts).
        words = self.concepts = concepts.read_concepts(config, self.latent_cache)
        logger.info("%s", precision_text)  # after the cheap checks: a user error is the only line
        self.threads = run_dir.choose_threads(config, output_dir, resume_dir is not None, device)  # CPU: free cores
        concepts.refuse_several_processes(words, accelerator.num_processes)
        config = self.config = words[0].config  # the run's options: the first word's (every word's but its own keys)
        image_paths, data = words[0].image_paths, words[0].data
        check_tokenizer = concepts.tokenizer_checks(words)
        with accelerator.local_main_process_first():  # one hub download per machine; the others then read its cache
            model_dir = resolve_model_dir(config.pretrained_model_name_or_path, config.revision)
        dtype = precision.frozen_dtype(config)  # the frozen parts load in it, straight onto the device
        parts = self.parts = load_model_parts(
            str(model_dir), config.revision, config.tokenizer_name, check_tokenizer, dtype, device
        )
        for word in words:
            word.config = formats_for_model(word.config, parts)  # the root script's pdparams: not for SDXL
            builders.check_sizes_for_family(word.config, parts.family, word.data)
        config = self.config = words[0].config
        check_text_encoders(parts.family, config.text_encoders)
        language = choose_language(config.language, config.pretrained_model_name_or_path, parts.family)
        identity = run_dir.run_identity(config, parts, image_paths, self.latent_cache)
        identity["language"] = language  # the templates change the examples, so a resume must keep them
        identity["data"] = run_dir.data_identity(config, data)  # so do captions, buckets and masks
        if len(words) > 1:
            identity["concepts"] = concepts.identity_of_words(words, parts)
        previous_record = run_dir.check_resume_identity(output_dir, identity) if resume_dir else None

        # Latents: each view through the VAE once, when first drawn; the cache lets the VAE go once full.
        for word in words:
            word.latent_cache = self.latent_cache
            if word.latent_cache is None:
                word.latent_cache = builders.load_latents(word.config, parts, word.image_paths, device, word.data)  # type: ignore[arg-type]
        self.latent_cache = words[0].latent_cache
        parts.vae = None

        # The placeholder tokens: the only trainable tensors, [n, dim] per text encoder and word.
        trainable = self.trainable = concepts.add_words(parts, words, config.text_encoders)
        precision.apply_to_text_encoders(config, trainable)
        trainable.to(device)

        # Schedule, optimizer, and the state of a resumed run.
        resume_state, resume_rng = (None, None)
        if resume_dir is not None:
            resume_state, resume_rng = checkpoints.read_checkpoint(resume_dir, accelerator.process_index)
        seed = run_dir.choose_seed(config, previous_record, resume_state)
        for index, word in enumerate(words):  # each word its own stream (seed + its index)
            templates = templates_for(word.config.learnable_property, language)
            word.stream = builders.example_stream(word.config, word.latent_cache, templates, word.data, seed + index)
        stream = words[0].stream
        num_processes = accelerator.num_processes
        max_steps = max(builders.schedule_length(w.config, w.stream.epoch_length, num_processes) for w in words)
        # Pivotal tuning (--lora_rank): adapters on the frozen denoiser, before it is compiled or checkpointed.
        self.lora = add_lora(config, parts, trainable, seed)
        parts.denoiser = precision.apply_to_unet(config, parts.denoiser, device)
        self.trained_parameters = [*trainable.parameters(), *(self.lora.parameters() if self.lora else [])]
        self.optimizer = builders.run_optimizer(config, trainable, self.lora, num_processes)  # (and the norm rule)
        learning_rate = self.optimizer.param_groups[0]["lr"]
        self.lr_scheduler = builders.make_lr_scheduler(config, self.optimizer, max_steps)
        self.scaler = precision.grad_scaler(config, device)  # fp16 only
        if resume_state is not None:
            trainable.load_vectors(resume_state.vectors_by_encoder)
            self.optimizer.load_state_dict(resume_state.optimizer)
            self.lr_scheduler.load_state_dict(resume_state.lr_scheduler)
            if self.lora is not None:
                self.lora.load_state_dict(resume_state.lora)
            if self.scaler is not None and resume_state.grad_scaler:
                self.scaler.load_state_dict(resume_state.grad_scaler)  # the loss scale it had reached
            self.losses = list(resume_state.losses)
            self.start_step = resume_state.step
            if resume_rng is not None:
                checkpoints.set_rng_state(resume_rng)
            logger.info("resuming from %s at step %d of %d", resume_dir, self.start_step, max_steps)
            run_dir.warn_if_threads_differ(previous_record, device)
        else:
            torch.manual_seed(seed)  # only for anything a library draws; our draws use explicit generators
        self.model = accelerator.prepare(PivotalModule(trainable, self.lora) if self.lora else trainable)
        self.frozen_after = embedding_frozen_after(config, max_steps)  # --embedding_train_frac

        record = run_dir.run_record(config, seed, parts, identity, max_steps, learning_rate, device, num_processes)
        record["cpu_threads"] = self.threads.record() if self.threads is not None else None
        if previous_record is not None:
            record["resumed"] = previous_record.get("resumed", []) + [
                {"from_step": self.start_step, "at": run_dir.now()}
            ]
        self._run = run = RunContext(config, output_dir, parts, trainable, accelerator, stream, max_steps, seed, record)
        run.start_step, run.stop_requested = self.start_step, self._early_stop

        def save_record() -> None:
            if accelerator.is_main_process:
                atomic_write_json(output_dir / RUN_FILE, record)

        run.save_record = save_record
        concepts.word_views(run, words)
        run.save_record()
        self.stop_reason = "max_train_steps"
        for word in words:  # None with --eval_steps 0
            inputs = (word.latent_cache, word.stream, device, word.weights, self.lora, word.name, max_steps)
            word.evaluation = HeldOutEvaluation.for_run(word.config, parts, *inputs)
        if resume_state is not None:
            concepts.load_held_out_state(words, resume_state.held_out, self.start_step)
        for word in words:
            if word.evaluation is not None and not word.evaluation.history:
                word.evaluation.evaluate(word.run, self.start_step)  # where the curve starts
        self.per_update = config.examples_per_update(num_processes)
        self.loss_settings = LossSettings.from_config(config)
        self.objective_for = ObjectiveFor(parts, self.loss_settings)
        logger.info(
            "%d steps, %d example(s) per step (batch %d x accumulation %d x %d process(es)), lr %.3g, %s",
            max_steps,
            self.per_update,
            config.train_batch_size,
            config.gradient_accumulation_steps,
            num_processes,
            learning_rate,
            parts.prediction_type,
        )
        cost = builders.cpu_step_estimate(config, parts, device, num_processes, max_steps)
        if cost is not None:
            logger.info("%s", cost)
        for observer in self.observers:
            observer.on_start(run)
        self.started = time.perf_counter()
        self.setup_evaluation_seconds = sum(w.evaluation.seconds for w in words if w.evaluation is not None)
        return run

    # --- the loop --------------------------------------------------------------------------------
    def loop(self) -> None:
        run, trainable = self.run, self.trainable
        for step in range(self.start_step + 1, run.max_steps + 1):
            step_started = time.perf_counter()
            last_good = {name: vectors.detach().clone() for name, vectors in trainable.vectors_by_encoder().items()}
            out_of_memory = False
            try:
                mean_loss = self.accumulate_gradients(step)
                if not math.isfinite(mean_loss):
                    self.stop_diverged(f"the loss became {mean_loss} at step {step}", step - 1)
                self.optimizer_step(step)
                if not trainable.all_finite():
                    trainable.load_vectors(last_good)
                    self.stop_diverged(f"the token vectors became non-finite at step {step}", step - 1)
                self.losses.append(mean_loss)
                step_seconds = time.perf_counter() - step_started
                eval_loss = self.evaluate_if_due(step)
                lr = self.lr_scheduler.get_last_lr()[0]
                state = StepState(
                    step,
                    run.max_steps,
                    mean_loss,
                    lr,
                    step_seconds,
                    eval_loss,
                    getattr(self.latent_cache, "views_encoded", None),
                )
                for observer in self.observers:
                    observer.on_step(run, state)
            except torch.OutOfMemoryError:
                out_of_memory = True  # handled below, once the error's frames (and the activations they hold) are gone
            if out_of_memory:
                self.stop_out_of_memory(step, last_good)
            self.save_if_due(step)
            if step == run.max_steps:
                break  # the last step, or the one --stop_when_converged made the last

    def evaluate_if_due(self, step: int) -> Optional[float]:
        """eval_loss when due (every --eval_steps and at the end; with several words, their mean); with
        --stop_when_converged, a converged curve makes this step the run's last (``run.max_steps``), so observers and
        finish see a normal end (several words: a converged word freezes, and the run ends when every word has)."""
        value, all_converged = concepts.evaluate_due(self.concepts, step, self.run.max_steps)
        if all_converged:
            self.stop_reason, self.run.max_steps = "converged", step
        return value

    def accumulate_gradients(self, step: int) -> float:
        """Forward and backward over this step's micro-batches; the mean loss over every process."""
        config, accelerator = self.config, self.run.accelerator
        optimizers.before_gradients(self.optimizer)  # a schedule-free optimizer's gradient point
        num_processes, accumulation = accelerator.num_processes, config.gradient_accumulation_steps
        step_loss = torch.zeros((), device=self.device)
        words = concepts.active(self.concepts)  # every word still learning, each its own examples (training.concepts)
        for word in words:
            for micro in range(accumulation):
                offset = (micro * num_processes + accelerator.process_index) * config.train_batch_size
                first = (step - 1) * self.per_update + offset
                examples = [word.stream[index] for index in range(first, first + config.train_batch_size)]
                is_last_micro = micro == accumulation - 1
                with accelerator.no_sync(self.model) if not is_last_micro else contextlib.nullcontext():
                    loss = denoising_loss(
                        self.model,
                        self.parts,
                        self.parts.tokenizer,
                        word.latent_cache,
                        examples,
                        self.device,
                        self.loss_settings,
                        word.weights,
                        self.objective_for,
                    )
                    scaled = loss / accumulation
                    accelerator.backward(self.scaler.scale(scaled) if self.scaler is not None else scaled)
                step_loss += loss.detach() / accumulation
        step_loss = step_loss / len(words) if len(words) > 1 else step_loss  # the words' mean, for the log
        return float(accelerator.reduce(step_loss, reduction="mean")) if num_processes > 1 else float(step_loss)

    def optimizer_step(self, step: int) -> None:
        """The optimizer on the vectors (and LoRA adapters; through fp16's loss scaler), then the LR schedule, unless the
        scaler skipped the step. Past --embedding_train_frac the vectors have no gradient, so it leaves them as they are."""
        scaler = self.scaler
        alone = self.run.accelerator.num_processes == 1 and not self.config.lora_text_encoder
        freeze_embedding_past(self.trainable, step, self.frozen_after, alone)
        if self.config.max_grad_norm > 0:
            if scaler is not None:
                scaler.unscale_(self.optimizer)  # clip the true gradients
            self.run.accelerator.clip_grad_norm_(self.trained_parameters, self.config.max_grad_norm)
        if scaler is None:
            self.optimizer.step()
            self.lr_scheduler.step()
        else:
            scale = scaler.get_scale()
            scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
            if scaler.get_scale() >= scale:  # the scale drops only on a skipped step
                self.lr_scheduler.step()
            else:
                logger.debug("fp16: gradients overflowed; step skipped, loss scale %g -> %g", scale, scaler.get_scale())
        self.optimizer.zero_grad(set_to_none=True)
        optimizers.after_step(self.optimizer, self.trainable, self.config)  # schedule-free's x; the norm rule

    def save_if_due(self, step: int) -> None:
        """Snapshots every --save_steps, checkpoints every --checkpointing_steps, and a clean stop on a signal."""
        config, run = self.config, self.run
        if run.is_main_process and step % config.save_steps == 0 and step < run.max_steps:
            for word in concepts.active(self.concepts):
                self.saved.extend(write_snapshot(word.run, step, self.lora))  # type: ignore[arg-type]
        stop = agreed_stop(run)
        every = config.checkpointing_steps
        due = every is not None and every > 0 and step % every == 0 and step < run.max_steps
        if due or stop:
            checkpoint = self.save_checkpoint(step)
            if stop:
                self.saved.extend(self.write_word_files(step))  # a stopped run keeps its LoRA too
                run_dir.finish_record(run, "interrupted", step, self.losses, self.started, self.saved)
                raise TrainingInterrupted(step, run.max_steps, stop, str(checkpoint))

    def write_word_files(self, step: int) -> list[Path]:
        """Every word's current vectors in its files (and with --lora_rank the adapters)."""
        return [path for word in self.concepts for path in write_embedding_files(word.run, step, self.lora)]  # type: ignore[arg-type]

    def save_checkpoint(self, step: int) -> Path:
        embedding = concepts.checkpoint_embeddings(self.concepts, step, embedding_of)
        held_out = concepts.held_out_state(self.concepts)
        scaler = self.scaler.state_dict() if self.scaler is not None else None
        lora = self.lora.state_dict() if self.lora is not None else None
        return checkpoints.save_checkpoint(
            self.run, step, self.optimizer, self.lr_scheduler, self.losses, embedding, held_out, scaler, lora
        )

    def stop_diverged(self, what: str, good_step: int) -> None:
        where = ""
        if good_step > 0:
            checkpoint = self.save_checkpoint(good_step)
            first = self.write_word_files(good_step)[:1] or [
                self.run.output_dir / embedding_file_name(self.config.embedding_formats[0])
            ]
            where = f"; the last good vectors (step {good_step}) are in {first[0]} and {checkpoint}"
        run_dir.finish_record(self.run, "diverged", good_step, self.losses, None, [])
        raise TrainingDiverged(f"{what}{where}. {DIVERGED_HINT}")

    def stop_out_of_memory(self, step: int, last_good: dict[str, torch.Tensor]) -> None:
        """The device ran out of memory in ``step``: keep the last good vectors, and end in one line naming what to change.

        One process writes a checkpoint of the last good step; several do not (the others may be waiting in a
        collective that the one out of memory will never join), and the last periodic checkpoint is the one to resume."""
        run = self.run
        good_step = step if len(self.losses) >= step else step - 1  # validation can run out after the update
        if good_step < step:
            self.trainable.load_vectors(last_good)
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        where = ""
        if run.accelerator.num_processes > 1:
            found = checkpoints.list_checkpoints(run.output_dir)
            where = f"; the last checkpoint is {found[-1]}" if found else ""
        elif good_step > self.start_step:
            checkpoint = self.save_checkpoint(good_step)
            first = self.write_word_files(good_step)[:1] or [
                run.output_dir / embedding_file_name(self.config.embedding_formats[0])
            ]
            where = f"; the vectors of step {good_step} are in {first[0]} and {checkpoint}"
        elif good_step > 0:
            where = f"; this run started from {run.output_dir / f'checkpoint-{good_step}'}"
        run_dir.finish_record(run, "out_of_memory", good_step, self.losses[:good_step], None, [])
        raise TrainingOutOfMemory(out_of_memory_text(self.config, self.device, step, where))

    # --- finish ----------------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        run, config = self.run, self.config
        elapsed = time.perf_counter() - self.started
        words = [(w.name, embedding_of(w.config, w.trainable, run.max_steps)) for w in self.concepts]
        embedding = words[0][1]
        embedding_path = run.output_dir / embedding_file_name(config.embedding_formats[0], concept=words[0][0])
        if run.is_main_process:
            self.saved.extend(write_final_files(run, embedding, self.lora, words if len(words) > 1 else ()))
        run.record["vectors_sha256_by_rank"] = run_dir.vectors_digest_by_rank(run)
        run.record["stop_reason"] = self.stop_reason
        for word in self.concepts:
            if word.evaluation is not None and word.evaluation.best_step is not None and run.is_main_process:
                self.saved.extend(run.output_dir / name for name in word.evaluation.best_files())
        if run.is_main_process:
            run_dir.finish_record(run, "completed", run.max_steps, self.losses, self.started, self.saved, elapsed)
        self.trainable.detach_hook()
        run.accelerator.wait_for_everyone()
        steps_here = run.max_steps - self.start_step
        result = TrainResult(
            run.output_dir,
            embedding_path,
            embedding,
            run.max_steps,
            self.losses,
            self.saved,
            steps_here,
            self.stop_reason,
        )
        this_run, tokens = f"{steps_here} this run, " if steps_here != run.max_steps else "", run_dir.tokens_text(self)
        evaluation = sum(w.evaluation.seconds for w in self.concepts if w.evaluation is not None)
        times = run_dir.time_text(self, elapsed, evaluation, run.record.get("timings", {}).get("validation_seconds", 0))
        result.summary = f"learned {tokens} in {run.max_steps} steps ({this_run}{times}); {concepts.files_text(self.concepts, self.run, self.stop_reason)}"
        for observer in self.observers:
            observer.on_end(run, result)
        logger.debug("%s", result.summary)  # the CLI prints it, after the progress bar has closed
        return result
