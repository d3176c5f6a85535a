"""`finetune(**options) -> summary`: the training run.

Steps: check the options and the output folder -> torchrun setup (dist.py) -> load the checkpoint (float weights,
no CPU inference rewrites) and its processor -> read and check every data row (data.py) -> LoRA (lora.py) or full
SFT -> the vision tower frozen under no_grad (LoRA's default) and gradient checkpointing (recompute.py) -> AdamW,
linear warmup then cosine decay to 0 -> optimizer steps over `grad_accum` micro-batches of `batch_size`
conversations per rank, each step's loss the mean token cross-entropy of the global batch, gradients clipped to
max_grad_norm -> eval loss and checkpoints at their intervals -> the adapter or the full checkpoint, metrics.jsonl
and loss.png in the output folder (the training checkpoints are removed once the result is written).

Precision: dtype "auto" is bfloat16 autocast on CUDA GPUs with bf16 and on CPUs with AVX512-BF16 or AMX, float32
elsewhere. LoRA keeps the frozen base in bfloat16 and the adapters in float32; full SFT keeps float32 master weights
and runs the matmuls in bfloat16. The cross-entropy is float32 either way.
Determinism: the data order comes from (seed, epoch) and the RNG (dropout) is re-seeded from (seed, step, rank) at
every step, so a resumed run repeats the uninterrupted run's losses exactly (CPU, float32).
Ctrl-C (SIGINT) or SIGTERM: the current step finishes, a checkpoint is written and the summary says how to resume;
a second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from pathlib import Path

import torch

from ..files.check import OutputError, check_folder
from . import dist as distmod
from . import recompute, state
from .options import STRUCTURAL, TrainOptions, warmup_steps
from .report import METRICS, PLOT, Report, plot
from .stop import StopFlag, Stopped

SCHEDULE = ("lr", "warmup", "epochs", "max_steps", "weight_decay", "max_grad_norm")  # also fixed on resume


def finetune(**options) -> dict:
    """Train with `options` (TrainOptions' fields) and return the run's summary (see Trainer.run)."""
    opts = TrainOptions.from_kwargs(options)
    problem = opts.check()
    if problem:
        raise ValueError(problem)
    from ..loading import check_device

    check_device(opts.device)
    from ..resolve import resolve_model

    opts = dataclasses.replace(opts, model=str(resolve_model(opts.model)))  # the CLI has resolved it already
    d = distmod.setup(opts.device)
    trainer = Trainer(opts.resolved(), d)
    try:
        summary = trainer.run()
        d.barrier()  # every rank done before the group goes: a rank that leaves first can abort another's gloo threads
        return summary
    except KeyboardInterrupt:
        raise Stopped(trainer.done) from None
    finally:
        d.close()


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: float32 (no autocast) or bfloat16."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        cpu = torch.cpu
        fast = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or \
            getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if fast else torch.float32
    return torch.float32


def lr_factor(step: int, warm: int, total: int) -> float:
    """Linear warmup over `warm` steps (the first step already at 1/warm), then cosine decay towards 0."""
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + rank) % (2 ** 63)


class Trainer:
    def __init__(self, opts: TrainOptions, d: distmod.Dist):
        self.opts, self.dist = opts, d
        self.out = Path(opts.output)
        self.done = 0  # steps completed, resumed ones included

    # ---- set-up -------------------------------------------------------------------------------------------------
    def _check_output(self) -> str | None:
        out, o = self.out, self.opts
        try:
            check_folder("output", out)  # a file on the way, or a folder that takes no files
        except OutputError as e:
            return str(e)
        if not out.is_dir() or not any(out.iterdir()) or o.overwrite:
            return None
        if o.resume and _inside(Path(o.resume), out):
            return None  # continuing this folder's own run
        return (f"output folder {out} exists and is not empty; pass --overwrite (overwrite=True) to write into it, "
                f"or choose another folder")

    def _fail_together(self, problem: str | None, exc=ValueError) -> None:
        problem = self.dist.agree(problem)
        if problem:
            raise exc(problem)

    def run(self) -> dict:
        o, d = self.opts, self.dist
        self._fail_together(self._check_output() if d.main else None)
        from ..loading import load_model
        from ..processor import Processor
        from .batches import Order
        from .data import load_samples

        t0 = time.perf_counter()
        self.cdtype = compute_dtype(o.dtype, d.device)
        weights = torch.bfloat16 if (o.lora and self.cdtype == torch.bfloat16) else torch.float32
        model, config, folder = load_model(o.model, dtype=weights, device=d.device)
        self.model, self.config, self.folder = model, config, folder
        processor = Processor.from_pretrained(folder)
        self.processor, knobs = processor, o.knobs()
        problem = None
        try:
            samples, skipped = load_samples(o.data, processor, o.max_seq_len, o.skip_bad, **knobs)
            evals = load_samples(o.eval_data, processor, o.max_seq_len, o.skip_bad, what="evaluation data",
                                 **knobs)[0] \
                if o.eval_data else []
        except ValueError as e:
            problem, samples, skipped, evals = str(e), [], [], []
        self._fail_together(problem)
        self.samples, self.evals = samples, evals
        self.order = order = Order(samples, o.batch_size, o.seed, d.rank, d.world_size)
        if len(order) < o.grad_accum:
            self._fail_together(f"{len(samples)} samples make {len(order)} batches per epoch, fewer than grad_accum "
                                f"({o.grad_accum}); lower --grad-accum or --batch-size")
        torch.manual_seed(o.seed)  # the LoRA initialisation
        trainable, names = self._prepare_model()
        self.names = names
        self.steps_per_epoch = max(1, len(order) // o.grad_accum)
        self.total = o.max_steps or o.epochs * self.steps_per_epoch
        self.warm = warmup_steps(o.warmup, self.total)
        fused = {"fused": True} if d.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(trainable, lr=o.lr, weight_decay=o.weight_decay, **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.warm, self.total))
        self.fingerprint = {"model": state.model_fingerprint(folder), "data": state.data_fingerprint(samples),
                            "world_size": d.world_size}
        start = self._resume() if o.resume else 0
        if d.main and not o.resume:
            self._clear_previous()
        self.trainable = trainable
        self.loss_module = d.wrap(_loss_module(model), find_unused=self._may_skip_params())
        report = Report(self.out if d.main else None, self.total, start, o.progress and d.main)
        if d.main and skipped:
            report.message(f"skipped {len(skipped)} bad row{'s' if len(skipped) > 1 else ''} (--skip-bad)")
        self.report = report
        try:
            with StopFlag(report) as stop:
                done, interrupted = self._train(start, stop)
        finally:
            report.close()
        return self._finish(done, interrupted, len(samples), len(skipped), time.perf_counter() - t0)

    def _prepare_model(self):
        o, model = self.opts, self.model
        for p in model.parameters():
            p.requires_grad_(False)
        vision_trained = False
        if o.lora:
            from .lora import add_lora, lora_parameters

            paths = add_lora(model, o.lora_r, o.lora_alpha, o.lora_dropout, o.targets)
            if self.dist.device.type == "cpu":
                from ..cpu.dropout import use_fast_dropout

                use_fast_dropout(model)  # the masks hashed from seeds of torch's generator: one native pass each
            vision_trained = any(p.startswith("model.vision_tower.") for p in paths)
            params = lora_parameters(model)
            for p in params:
                p.requires_grad_(True)
        else:
            vision_trained = o.freeze_vision is False or o.freeze_vision is None
        freeze = o.freeze_vision if o.freeze_vision is not None else not vision_trained
        if o.lora and freeze and vision_trained:
            raise ValueError("targets include vision tower modules but freeze_vision is on; use --no-freeze-vision "
                             "(or targets without the vision tower)")
        self.freeze = freeze
        if o.full:
            for name, p in model.named_parameters():
                if not (freeze and name.startswith("model.vision_tower.")):
                    p.data = p.data.clone()  # own memory: loaded weights may be mapped from the file
                    p.requires_grad_(True)
        if freeze:
            recompute.freeze_vision_tower(model)
        if o.gradient_checkpointing:
            recompute.checkpoint_layers(model, vision=not freeze)
        model.train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [p for _, p in named], [n for n, _ in named]

    def _may_skip_params(self) -> bool:
        """Whether a batch may leave trainable parameters unused (DDP must then look for them): text-only batches
        leave the vision tower and projector unused."""
        return any(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in self.names)

    def _clear_previous(self) -> None:
        """A fresh run into an --overwrite folder: the previous run's checkpoints and metrics go."""
        shutil.rmtree(self.out / state.FOLDER, ignore_errors=True)
        for name in (METRICS, PLOT):
            (self.out / name).unlink(missing_ok=True)

    def _resume(self) -> int:
        o = self.opts
        folder = state.find(o.resume)
        meta, tensors, rest = state.load(folder)
        state.check_compatible(meta, self.fingerprint, o.to_dict(), STRUCTURAL + SCHEDULE)
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}  # what this run trains
        state.check_fits(folder, meta["step"], self.total, tensors, params)
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        self.order.load_state_dict(meta["order"])
        try:
            self.optimizer.load_state_dict(rest["optimizer"])
            self.scheduler.load_state_dict(rest["scheduler"])
            state.set_rng_state(rest["rng"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError):
            raise state.StateError(state.damaged_state(folder)) from None
        self.resumed_from = str(folder)
        return meta["step"]

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.cdtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.dist.device.type, dtype=self.cdtype)

    def _batch(self, indices):
        from .batches import collate

        return collate([self.samples[i] for i in indices], self.processor, **self.opts.knobs()).to(self.dist.device)

    def _train(self, start: int, stop: StopFlag) -> tuple[int, bool]:
        o, d = self.opts, self.dist
        eval_every = o.eval_every or self.steps_per_epoch
        save_every = o.save_every or self.steps_per_epoch
        done = self.done = start
        for step in range(start, self.total):
            torch.manual_seed(step_seed(o.seed, step, d.rank))
            epoch = self.order.epoch
            micro = [self.order.next_batch() for _ in range(o.grad_accum)]
            batches = [self._batch(b) for b in micro]
            tokens, samples = d.all_sum([sum(b.n_tokens for b in batches), sum(b.n_samples for b in batches)])
            scale = d.world_size / max(tokens, 1.0)  # DDP averages over ranks: this makes it a global token mean
            loss_sum = 0.0
            for k, b in enumerate(batches):
                sync = k == len(batches) - 1 or not d.active
                with (contextlib.nullcontext() if sync else self.loss_module.no_sync()):
                    with self._autocast():
                        loss = self.loss_module(b)
                    (loss * scale).backward()
                loss_sum += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, o.max_grad_norm)
            loss = d.all_sum([loss_sum])[0] / max(tokens, 1.0)  # the same on every rank, as the gradient is
            if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
                self._diverged(step + 1, loss, float(grad_norm))
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            done = self.done = step + 1
            self.report.step(done, epoch, loss, lr, float(grad_norm), int(samples), int(tokens))
            if self.evals and (done % eval_every == 0 or done == self.total):
                self.report.eval(done, *self.evaluate())
            stopping = d.any(stop.requested)
            if stopping or done % save_every == 0:
                self.save(done)
            if stopping:
                return done, True
        return done, False

    def _diverged(self, step: int, loss: float, grad_norm: float) -> None:
        """Stop a run whose loss or gradient is no longer finite, before the step changes any weight: every later
        step, checkpoint and the result would hold NaN. The checkpoints written so far stay for --resume."""
        self.optimizer.zero_grad(set_to_none=True)
        written = sorted((self.out / state.FOLDER).glob("step-*")) if self.out.is_dir() else []
        where = (f"the last checkpoint, {written[-1]}, is kept: resume from it with --resume and a lower --lr"
                 if written else "no checkpoint was written: lower --lr")
        raise Diverged(f"training diverged at step {step} of {self.total}: the loss ({loss:.4g}) or the gradient norm "
                       f"({grad_norm:.4g}) is not finite, so the step was not applied and no result was written; "
                       f"{where} (now {self.opts.lr:g})")

    @torch.no_grad()
    def evaluate(self) -> tuple[float, int]:
        """Mean token cross-entropy over the eval data (every rank takes every world_size-th batch)."""
        from .batches import collate
        from .loss import loss_sum

        o, d = self.opts, self.dist
        model = self.model
        model.eval()
        idx = sorted(range(len(self.evals)), key=lambda i: (self.evals[i].n_units, self.evals[i].length))
        chunks = [idx[k:k + o.batch_size] for k in range(0, len(idx), o.batch_size)]
        total, tokens = 0.0, 0
        for chunk in chunks[d.rank::d.world_size]:
            b = collate([self.evals[i] for i in chunk], self.processor, **o.knobs()).to(d.device)
            with self._autocast():
                s, n = loss_sum(model, b)
            total, tokens = total + s.item(), tokens + n
        model.train()
        total, tokens = d.all_sum([total, tokens])
        return total / max(tokens, 1.0), int(tokens)

    def save(self, step: int) -> Path | None:
        folder = None
        if self.dist.main:
            params = dict(self.model.named_parameters())
            meta = {"epoch": self.order.epoch, "order": self.order.state_dict(), "options": self.opts.to_dict(),
                    "fingerprint": self.fingerprint, "total_steps": self.total}
            folder = state.save(self.out, step, {n: params[n] for n in self.names}, self.optimizer.state_dict(),
                                self.scheduler.state_dict(), meta)
        self.dist.barrier()
        self.last_checkpoint = folder
        return folder

    # ---- the result ---------------------------------------------------------------------------------------------
    def _finish(self, done: int, interrupted: bool, n_samples: int, n_skipped: int, seconds: float) -> dict:
        o, d = self.opts, self.dist
        summary = {"output": str(self.out), "mode": "full" if o.full else "lora", "steps": done,
                   "total_steps": self.total, "samples": n_samples, "skipped": n_skipped,
                   "trainable_parameters": sum(p.numel() for p in self.trainable), "dtype": str(self.cdtype)[6:],
                   "world_size": d.world_size, "seconds": round(seconds, 3), "interrupted": interrupted,
                   "metrics": str(self.out / METRICS), "plot": str(self.out / PLOT)}
        from .report import read_metrics

        if d.main:
            train, evals = read_metrics(self.out / METRICS)
            summary.update(first_loss=train[0]["loss"] if train else None,
                           final_loss=train[-1]["loss"] if train else None,
                           eval_loss=evals[-1]["eval_loss"] if evals else None)
            plot(self.out / METRICS, self.out / PLOT)
            if interrupted:
                summary["checkpoint"] = str(self.last_checkpoint)
            else:
                self._write_result()
                shutil.rmtree(self.out / state.FOLDER, ignore_errors=True)
        d.barrier()
        return summary

    def _write_result(self) -> None:
        from .output import write_adapter, write_full

        recompute.undo(self.model)
        self.model.eval()
        if self.opts.lora:
            write_adapter(self.model, self.out, self.opts.model)
        else:
            write_full(self.model, self.config, self.folder, self.out)


class Diverged(ValueError):
    """The loss or the gradient became NaN or infinite (a learning rate too high for the data, most often)."""


def _loss_module(model):
    from .loss import TokenLoss

    return TokenLoss(model)


def _inside(p: Path, folder: Path) -> bool:
    try:
        p.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False
