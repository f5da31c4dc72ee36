"""`MIRCallback`: MIR of the live model at every checkpoint save (or every N steps) of a Hugging
Face `Trainer`, logged through the trainer's own `log`, so whatever `report_to` names receives it.

    from pipelines.trainer_callback import MIRCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=processor)
    MIRCallback(manifest="probe.jsonl", out="mir-out").attach(trainer)
    trainer.train()          # writes mir-out/step-<N>.zarr at each save and logs mir/mir, mir/fd_layer_<k>

The callback needs the trainer (for its `log`); `attach` adds it and keeps the reference.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .training import Probe, StepMIR, check_probe, mir_at_step


class MIRCallback(TrainerCallback):
    """Extract and analyse a fixed probe set with the live model at each save, or every `every` steps.

    `manifest`, `out` and the keyword settings are those of `pipelines.training.Probe`; `processor`
    defaults to the trainer's `processing_class`; `run` defaults to the trainer's run name.
    """

    def __init__(self, manifest: str | os.PathLike, out: str | os.PathLike, *, every: int | None = None,
                 processor: Any = None, run: str | None = None, prefix: str = "mir", **settings: Any):
        if every is not None and every < 1:
            raise ValueError("every must be a positive number of steps (or None: at each checkpoint save)")
        self.probe = Probe(manifest=str(manifest), out=str(out), run=run or "run", **settings)
        self._run_given = run is not None
        self.every = every
        self.processor = processor
        self.prefix = prefix
        self.trainer = None
        self.history: list[StepMIR] = []
        self._done: set[int] = set()

    def attach(self, trainer: Any) -> "MIRCallback":
        """Add this callback to `trainer` and log through it."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError("MIRCallback logs through the trainer: add it with MIRCallback(...).attach(trainer)")
        if not self._run_given:
            self.probe.run = args.run_name or Path(args.output_dir).name
        check_probe(self.probe)  # a missing or broken probe file fails now, not at the first save

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every is not None and state.global_step % self.every == 0:
            self._measure(args, state, model, processing_class, checkpoint=None)

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every is None:  # the Trainer calls on_save after the checkpoint folder is written
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self._measure(args, state, model, processing_class, checkpoint=checkpoint)

    def _measure(self, args, state, model, processing_class, checkpoint) -> None:
        step = int(state.global_step)
        if step in self._done:  # e.g. the final save at a step already measured
            return
        processor = self.processor or processing_class
        if processor is None or getattr(processor, "image_token", None) is None:
            raise RuntimeError("MIRCallback needs the model's processor: pass processor=... or give the Trainer "
                               "processing_class=processor")
        outcome = mir_at_step(model, processor, self.probe, step, checkpoint=checkpoint)
        self._done.add(step)
        self.history.append(outcome)
        scalars = outcome.scalars(self.prefix)
        if scalars:  # only the rank that analysed has them; Trainer integrations log on rank 0 anyway
            self.trainer.log(scalars)
