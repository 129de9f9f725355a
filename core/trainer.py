"""The training loop: one readable ``train()``.

AdamW with parameter groups (no weight decay on 1-D parameters and the logit scale), warm-up then
cosine (or constant), gradient clipping, autocast precision, extra optimizers owned by loss
plugins (a discriminator) alternating with the generator, buffered tracking, periodic evaluation,
atomic checkpoints, deterministic resume, clean Ctrl-C. Distributed (torchrun) is handled by
core.dist: each rank takes its slice of every global batch, only rank 0 writes and tracks.

``train()`` is the step loop; ``_Run`` holds one run's state and its phases (set-up and resume,
tracking, the generator step, the adversary step, evaluation, checkpoints, finish), ``_Window``
the logging window. The run directory (name, resume, completion marker) is core.rundir's.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler, Subset

from core import dist, quant_stats, rundir
from core.checkpoint import check_resumable, load_checkpoint, plugin_generators, restore_rng, save_checkpoint
from core.config import config_hash, flatten, to_dict
from core.errors import ConfigError
from core.figures import log_eval_figures
from core.interfaces import LossResult, LossTermKey
from core.model import Tokenizer, parameter_counts
from core.plugins import Registry, get_registry
from core.seeding import seeded
from core.tracking import Tracker, git_tags, make_tracker

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Built:
    """Everything a run needs, built before any file is written (bad input leaves nothing behind)."""

    model: Tokenizer
    losses: nn.ModuleList
    labels: list[str]
    evaluators: list[Any]
    train_set: Any
    eval_set: Any


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, float]
    status: str
    run_id: str | None = None
    model: Tokenizer | None = None  # the trained model (None when the run was already complete)
    train_seconds: float = 0.0  # wall time of the step loop (logging included; final checkpoint/eval not)


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------


def _build(reg: Registry, kind: str, cfg: Any, path: str, **kw: Any) -> Any:
    try:
        return reg.get(kind, cfg.type)(cfg, **kw)
    except ConfigError as e:
        raise e.at(path) from None


def build(exp: Any, reg: Registry | None = None) -> Built:
    """Every component is built from its own stream seeded by (exp.seed, its path) (core.seeding),
    so seed s gives the same data, eval images and initial weights of every component whose
    config is the same in every cell of a sweep: the cells of a sweep are paired by seed. Losses
    are keyed by their label (type, or type+index when a type repeats), not by position. The
    global stream is left at ``manual_seed(exp.seed)`` whatever was built."""
    reg = reg or get_registry()
    torch.manual_seed(exp.seed)
    s = exp.seed
    with seeded(s, "data.train"):
        train_set = _build(reg, "datasets", exp.data, "data", split="train", seed=s)
    with seeded(s, "data.eval"):
        eval_set = _build(reg, "datasets", exp.data, "data", split="eval", seed=s)
    model = Tokenizer(exp.model, exp.data.image_size, reg, seed=s)
    losses, labels = [], []
    for i, lcfg in enumerate(exp.losses):
        dup = sum(c.type == lcfg.type for c in exp.losses) > 1
        labels.append(f"{lcfg.type}{i}" if dup else lcfg.type)
        with seeded(s, f"losses.{labels[-1]}"):
            losses.append(_build(reg, "losses", lcfg, f"losses.{i}", model=model))
    order = sorted(range(len(losses)), key=lambda i: losses[i].order)
    evaluators = []
    for i, ecfg in enumerate(exp.eval):
        with seeded(s, f"eval.{ecfg.type}{i}"):
            evaluators.append(_build(reg, "evaluators", ecfg, f"eval.{i}"))
    return Built(model, nn.ModuleList([losses[i] for i in order]), [labels[i] for i in order], evaluators, train_set, eval_set)


class TrainStep(nn.Module):
    """Model forward + every loss term in one module, so DistributedDataParallel sees every
    parameter the generator step uses (the text tower and logit scale in the model's forward,
    distillation heads, the prior). Returns (total, outputs, logs): logs maps metric name -> detached
    tensor. The batch's captions go to the model only when a loss that ``needs`` text is active
    this step (else the text tower would run, and join DDP's graph, for nothing)."""

    def __init__(self, model: Tokenizer, losses: nn.ModuleList, labels: list[str]) -> None:
        super().__init__()
        self.model, self.losses, self.labels = model, losses, labels

    def forward(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]:
        weights = [loss.schedule(step) for loss in self.losses]
        wants_text = any(w != 0 and "text" in loss.needs for w, loss in zip(weights, self.losses))
        outputs = self.model(batch["image"], batch.get("text") if wants_text else None)
        if not wants_text:  # the CLIP head's embedding, unread this step: kept, it would sit in DDP's
            outputs.pop("image_embed", None)  # graph of the outputs with no gradient (a reduction error)
        terms_so_far: dict[LossTermKey, torch.Tensor] = {}  # (type, term) -> weighted, summed over labels
        outputs["loss_terms"] = terms_so_far
        logs: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=batch["image"].device)
        for label, loss, w in zip(self.labels, self.losses, weights):
            if w == 0:
                continue
            result = loss(batch, outputs, step)
            if not isinstance(result, LossResult):
                raise TypeError(f"loss {label}: forward must return a core.interfaces.LossResult, got {type(result).__name__}")
            tw = loss.term_weights()
            for name, value in result.terms.items():
                weighted = (w * tw.get(name, 1.0)) * value.float()
                key = (loss.cfg.type, name)
                terms_so_far[key] = terms_so_far[key] + weighted if key in terms_so_far else weighted
                logs[f"loss/{label}/{name}"] = value.detach().float()
                logs[f"loss_w/{label}/{name}"] = weighted.detach()
                total = total + weighted
            for name, value in result.metrics.items():  # diagnostics: logged, never in the total
                logs[f"loss/{label}/{name}"] = value.detach().float()
        logs["loss/total"] = total.detach()
        for k, v in outputs["quant"].metrics.items():
            logs[f"quant/{k}"] = v.float()
        return total, outputs, logs


def aux_total(result: LossResult, label: str) -> torch.Tensor:
    """The aux (adversary) objective: the sum of an ``aux_loss`` result's terms."""
    if not isinstance(result, LossResult) or not result.terms:
        raise TypeError(f"loss {label}: aux_loss must return a core.interfaces.LossResult with terms (or None)")
    values = [v.float() for v in result.terms.values()]
    return sum(values[1:], values[0])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    return torch.device(name)


def param_groups(modules: list[nn.Module], exclude: set[int], weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay, seen = [], [], set(exclude)
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim < 2 or name.endswith("logit_scale") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: Any) -> float:
    warm = cfg.warmup * cfg.steps if cfg.warmup < 1 else cfg.warmup
    if warm > 0 and step < warm:
        return min(1.0, (step + 1) / warm)  # warm need not be an integer: never above the peak
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1.0, cfg.steps - warm))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


class StepBatchSampler(Sampler[list[int]]):
    """Batches for steps ``start .. total-1``: a fresh seeded permutation per epoch, so the batch at
    step s is a pure function of (seed, s) — resume needs no sampler state. Each rank takes
    ``[rank::world]`` of every global batch."""

    def __init__(self, n: int, batch: int, seed: int, start: int, total: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch, self.seed, self.start, self.total = n, batch, seed, start, total
        self.rank, self.world = rank, world
        self.per_epoch = n // batch

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while step < self.total:
            epoch, k = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            for j in range(k, self.per_epoch):
                if step >= self.total:
                    return
                yield perm[j * self.batch : (j + 1) * self.batch][self.rank :: self.world].tolist()
                step += 1


def _cycle(loader: DataLoader) -> Iterator[Any]:
    epoch = 0
    while True:
        if hasattr(loader.dataset, "set_epoch"):  # streams reshuffle per epoch
            loader.dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_loader(ds: Any, cfg: Any, seed: int, start: int) -> Iterator[Any]:
    rank, world = dist.rank(), dist.world_size()
    if cfg.batch_size % world:
        raise ConfigError("train.batch_size", f"{cfg.batch_size} is not divisible by the world size {world}")
    if isinstance(ds, IterableDataset):
        loader = DataLoader(ds, batch_size=cfg.batch_size // world, num_workers=cfg.num_workers, drop_last=True)
        it = _cycle(loader)
        for _ in range(start):  # approximate resume for streams: skip the batches already seen
            next(it)
        return it
    if len(ds) < cfg.batch_size:
        raise ConfigError("train.batch_size", f"{cfg.batch_size} is larger than the training set ({len(ds)} items)")
    sampler = StepBatchSampler(len(ds), cfg.batch_size, seed, start, cfg.steps, rank, world)
    return iter(DataLoader(ds, batch_sampler=sampler, num_workers=cfg.num_workers, persistent_workers=False))


class _Head(IterableDataset):
    """The first ``n`` items of a stream (the eval split of an iterable dataset)."""

    def __init__(self, ds: IterableDataset, n: int) -> None:
        self.dataset, self.n = ds, n

    def __iter__(self):
        for i, item in enumerate(self.dataset):
            if i >= self.n:
                return
            yield item


def eval_loader(ds: Any, cfg: Any) -> DataLoader:
    if isinstance(ds, IterableDataset):
        return DataLoader(_Head(ds, cfg.eval_size), batch_size=cfg.eval_batch_size)
    return DataLoader(Subset(ds, range(min(cfg.eval_size, len(ds)))), batch_size=cfg.eval_batch_size, shuffle=False)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: Tokenizer, evaluators: list[Any], loader: DataLoader, autocast: Any) -> dict[str, float]:
    from core.evaluation import run_evaluators

    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    try:
        with autocast():  # one pass of the eval split feeds every evaluator (core.evaluation)
            metrics.update(run_evaluators(model, evaluators, loader))
    finally:
        model.train(was_training)
    return metrics


# ------------------------------------------------------------------------------------------------
# interruption
# ------------------------------------------------------------------------------------------------


class StopFlag:
    """SIGINT/SIGTERM set a flag checked between steps; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.stop = False
        self.old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------
# one run: set-up, the steps, tracking, evaluation, checkpoints, finish
# ------------------------------------------------------------------------------------------------


class _Run:
    """One run's state from set-up to finish: the model and losses on the training device, the
    optimizers (the generator's, and one per loss that trains an adversary), the scheduler, the
    (DDP-wrapped) step module, the data, the tracker and the run directory (core.rundir)."""

    def __init__(self, exp: Any, built: Built, device: torch.device, resume: rundir.Resume,
                 on_eval: Callable[[int, dict[str, float]], None] | None) -> None:
        cfg = self.cfg = exp.train
        self.exp, self.built, self.device, self.on_eval = exp, built, device, on_eval
        self.resume, self.run_dir, self.is_main = resume, resume.run_dir, dist.rank() == 0
        self.model, self.losses = model, losses = built.model.to(device), built.losses.to(device)
        aux = [(i, list(loss.aux_parameters())) for i, loss in enumerate(losses)]
        aux_ids = {id(p) for _, ps in aux for p in ps}
        o = cfg.optimizer
        self.opt = o.build(param_groups([model, losses], aux_ids, o.weight_decay))
        self.aux_opts = {i: losses[i].aux_optimizer(ps) for i, ps in aux if ps}
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        # DDP must look for unused parameters only where some can be unused at a step: a text tower
        # that only evaluation reads, loss modules behind a schedule, a discriminator
        may_skip = model.text is not None or any(True for loss in losses for _ in loss.parameters())
        self.step_module = dist.wrap_ddp(TrainStep(model, losses, built.labels), device, find_unused=may_skip)
        self.start, self.run_id, self.skipped, self.resumed = 0, None, 0, False
        state = self._load_state() if resume.ckpt is not None else None
        # data before any file or MLflow run exists: a batch larger than the data is bad input
        self.data = train_loader(built.train_set, cfg, exp.seed, self.start)
        self.generators = plugin_generators(model, losses)
        if state is not None:  # after the loader: making its iterator draws from the global stream
            restore_rng(state["rng"], self.generators)
        self.ev_loader = eval_loader(built.eval_set, cfg)
        dtype = DTYPES[cfg.precision]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" and device.type == "cuda" else None
        self.usage_history: list[tuple[int, list[float]]] = []  # codebook usage per evaluation (figures)
        self.tracker = Tracker()  # the real one from open()

    def _load_state(self) -> dict[str, Any] | None:
        """Weights, optimizer and scheduler states and counters from the checkpoint being resumed
        (its random states are restored after the data loader exists). A weights-only checkpoint
        (core.convert) gives the model its weights and nothing else: a new run from step 0 (None)."""
        ckpt, model, losses = self.resume.ckpt, self.model, self.losses
        state = load_checkpoint(ckpt)
        if not state["optimizers"]:
            check_resumable(state, ckpt, {"model.": model}, {})
            model.load_state_dict({k[6:]: v for k, v in state["model"].items() if k.startswith("model.")})
            if self.is_main:
                print(f"vtok: starting {self.run_dir} from the weights in {ckpt} (weights only: new optimizer state, "
                      "step 0)", file=sys.stderr)
            return None
        self.resumed = True
        check_resumable(state, ckpt, {"model.": model, "losses.": losses},
                        {"main": self.opt, **{f"aux{i}": o for i, o in self.aux_opts.items()}})
        model.load_state_dict({k[6:]: v for k, v in state["model"].items() if k.startswith("model.")})
        losses.load_state_dict({k[7:]: v for k, v in state["model"].items() if k.startswith("losses.")})
        self.opt.load_state_dict(state["optimizers"]["main"])
        for i, o in self.aux_opts.items():
            o.load_state_dict(state["optimizers"][f"aux{i}"])
        self.sched.load_state_dict(state["extra"]["scheduler"])
        self.start, self.run_id, self.skipped = state["step"], state["extra"].get("run_id"), state["extra"].get("skipped", 0)
        if self.is_main:
            extended = " (a finished run, continued: the learning-rate schedule now ends at the new total)" if self.resume.continued else ""
            print(f"vtok: resuming {self.run_dir} from step {self.start} of {self.cfg.steps}{extended}", file=sys.stderr)
        return state

    def open(self, tracker: Tracker | None, tags: dict[str, str] | None, parent_run_id: str | None,
             run_name: str | None) -> None:
        """Write the run directory (rank 0) and start the tracked run: tags, params, parameter
        counts; a resumed run continues its own tracked run."""
        exp, cfg, run_dir = self.exp, self.cfg, self.run_dir
        if tracker is None:
            tracker = make_tracker(exp.tracking, exp.name, enabled=self.is_main)
        self.tracker = tracker
        resolved = to_dict(exp)
        if self.is_main:
            rundir.start(run_dir, resolved)
        all_tags = {"vtok.config_hash": config_hash(exp), "vtok.experiment": exp.name, "vtok.run_dir": str(run_dir.resolve()),
                    **git_tags(), **(tags or {})}
        all_tags["vtok.train_steps"] = str(cfg.steps)  # the param is the first run's; this follows continuations
        if exp.paper is not None and exp.paper.source:
            all_tags["vtok.paper"] = exp.paper.source
        # params: what the run computes (the sweep and paper sections are the sweep's and the report's)
        params = flatten({k: v for k, v in resolved.items() if k not in ("sweep", "paper")})
        self.run_id = tracker.start(run_name or exp.name, params, all_tags, run_id=self.run_id, parent_run_id=parent_run_id)
        if self.is_main and self.run_id and self.resumed:
            tracker.set_tags({"vtok.train_steps": str(cfg.steps)})
        if self.is_main and self.run_id and not self.resumed:
            tracker.log_artifact(run_dir / rundir.CONFIG)
            tracker.log_params({f"n_params.{k}": v for k, v in parameter_counts(self.model).items()})

    def generator_step(self, batch: dict[str, Any], step: int, acc: dict[str, list[torch.Tensor]]) -> tuple[Any, Any]:
        """Forward, the finiteness check, backward, clipping, optimizer and scheduler steps ->
        (outputs, logs); (None, None) for a skipped non-finite step (``train.on_nonfinite``)."""
        cfg, opt, scaler = self.cfg, self.opt, self.scaler
        with self.autocast():
            total, outputs, logs = self.step_module(batch, step)
        if not torch.isfinite(total).item():  # the one host sync per step (skip/stop needs it now)
            if cfg.on_nonfinite == "stop":
                raise NonFiniteLoss(f"non-finite loss at step {step}")
            self.skipped += 1
            opt.zero_grad(set_to_none=True)
            self.sched.step()
            self.tracker.log_metrics({"train/skipped_steps": self.skipped}, step)
            return None, None
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(opt)
        else:
            total.backward()
        if cfg.grad_clip:
            acc.setdefault("train/grad_norm", []).append(
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        self.model.after_optimizer_step()
        self.sched.step()
        return outputs, logs

    def adversary_step(self, batch: dict[str, Any], outputs: dict[str, Any], step: int, acc: dict[str, list[torch.Tensor]]) -> None:
        """Each loss that trains an adversary (a discriminator) takes its step on the detached outputs."""
        losses, aux_opts, autocast, built = self.losses, self.aux_opts, self.autocast, self.built
        for i, aopt in aux_opts.items():  # alternate: the adversary's step on detached outputs
            detached = {k: v.detach() if torch.is_tensor(v) else v for k, v in outputs.items()}
            with autocast():
                aout = losses[i].aux_loss(batch, detached, step)
            if aout is not None:
                atotal = aux_total(aout, built.labels[i])
                aopt.zero_grad(set_to_none=True)
                atotal.backward()
                dist.all_reduce_grads_([p for g in aopt.param_groups for p in g["params"]])
                losses[i].before_aux_step(aopt, step)
                aopt.step()
                for k, v in {**aout.terms, **aout.metrics, "total": atotal}.items():
                    acc.setdefault(f"aux/{built.labels[i]}/{k}", []).append(v.detach().float())

    def evaluate(self, step: int) -> dict[str, float]:
        """Rank 0 evaluates, logs the metrics, figures and evaluators' files; ``on_eval`` may stop the run."""
        metrics: dict[str, float] = {}
        if self.is_main:
            evaluators, tracker = self.built.evaluators, self.tracker
            metrics = evaluate(self.model, evaluators, self.ev_loader, self.autocast)
            tracker.log_metrics(metrics, step)
            files = [f for ev in evaluators for f in getattr(ev, "save_artifacts", lambda *a: [])(self.run_dir, step)]
            if self.run_id:
                tracker.flush()
                log_eval_figures(tracker, self.model, self.ev_loader, self.run_dir, step, self.usage_history)
                for path, where in files:
                    tracker.log_artifact(path, where)
            if self.on_eval is not None:
                self.on_eval(step, metrics)
        dist.barrier()
        return metrics

    def checkpoint(self, step: int) -> None:
        if not self.is_main:
            return
        sd = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        sd.update({f"losses.{k}": v for k, v in self.losses.state_dict().items()})
        optims = {"main": self.opt.state_dict(), **{f"aux{i}": o.state_dict() for i, o in self.aux_opts.items()}}
        extra = {"scheduler": self.sched.state_dict(), "run_id": self.run_id, "skipped": self.skipped}
        save_checkpoint(self.run_dir, step, sd, optims, extra, keep=self.cfg.keep_checkpoints, generators=self.generators)

    def finish(self, loop_start: float) -> RunResult:
        """The last checkpoint and evaluation, the completion marker, the tracked run FINISHED."""
        self.tracker.flush()
        loop_seconds = time.perf_counter() - loop_start
        self.checkpoint(self.cfg.steps)
        metrics = self.evaluate(self.cfg.steps)
        if self.skipped:
            metrics["skipped_steps"] = float(self.skipped)
        if self.is_main:
            rundir.write_complete(self.run_dir, metrics, self.run_id)
        self.tracker.end("FINISHED")
        return RunResult(self.run_dir, metrics, "FINISHED", self.run_id, self.model, loop_seconds)


class _Window:
    """The logging window: every step's logs and local quantizer statistics, reduced and logged
    every ``train.log_every`` steps (one stack and one host transfer per window)."""

    def __init__(self) -> None:
        self.acc: dict[str, list[torch.Tensor]] = {}
        self.qsteps: list[torch.Tensor] = []  # per-step flat quantizer statistics of the window
        self.qlayout: Any = None
        self.t_log, self.n_log = time.perf_counter(), 0

    def add(self, logs: dict[str, torch.Tensor], outputs: dict[str, Any], images: int) -> None:
        for k, v in logs.items():
            self.acc.setdefault(k, []).append(v)
        qflat, self.qlayout = quant_stats.flatten(outputs["quant"].stats)  # local usage statistics
        self.qsteps.append(qflat)
        self.n_log += images * dist.world_size()

    def flush(self, run: _Run, step: int, bar: Any) -> None:
        now, acc = time.perf_counter(), self.acc
        row = dict(zip(acc, torch.stack([torch.stack(v).mean() for v in acc.values()]).tolist()))
        # quant/usage etc.: the window's per-step statistics, summed over ranks in ONE collective
        row.update({f"quant/{k}": v for k, v in quant_stats.window_metrics(self.qsteps, self.qlayout).items()})
        row["train/lr"] = run.sched.get_last_lr()[0]
        row["train/images_per_s"] = self.n_log / max(now - self.t_log, 1e-9)
        run.tracker.log_metrics(row, step)
        self.acc, self.qsteps, self.t_log, self.n_log = {}, [], now, 0
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss/total']:.4f}", img_s=f"{row['train/images_per_s']:.0f}")


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------


def train(exp: Any, reg: Registry | None = None, *, built: Built | None = None, parent_run_id: str | None = None,
          tags: dict[str, str] | None = None, on_eval: Callable[[int, dict[str, float]], None] | None = None,
          tracker: Tracker | None = None, run_name: str | None = None) -> RunResult:
    """Train one experiment config end to end. ``on_eval(step, metrics)`` may raise to stop (pruning)."""
    cfg = exp.train
    built = built or build(exp, reg)
    device = pick_device(cfg.device)
    resume = rundir.resolve_resume(exp)
    if resume.complete:
        print(f"vtok: {resume.run_dir} is already complete at {cfg.steps} steps (raise train.steps to continue it; "
              "train.resume=never starts over)", file=sys.stderr)
        return RunResult(resume.run_dir, resume.finished["metrics"], "FINISHED", resume.finished.get("run_id"))
    run = _Run(exp, built, device, resume, on_eval)
    run.open(tracker, tags, parent_run_id, run_name)
    run.model.train()
    window, bar = _Window(), _progress(cfg, run.start, run.is_main)
    loop_start = time.perf_counter()
    try:
        with StopFlag() as flag:
            for step in range(run.start, cfg.steps):
                batch = to_device(next(run.data), device)
                outputs, logs = run.generator_step(batch, step, window.acc)
                if outputs is None:  # a skipped non-finite step
                    continue
                run.adversary_step(batch, outputs, step, window.acc)
                window.add(logs, outputs, batch["image"].shape[0])
                done_steps = step + 1
                if done_steps % cfg.log_every == 0 or done_steps == cfg.steps:
                    window.flush(run, done_steps, bar)
                if bar is not None:
                    bar.update(1)
                if cfg.eval_every and done_steps % cfg.eval_every == 0 and done_steps < cfg.steps:
                    run.evaluate(done_steps)
                if cfg.ckpt_every and done_steps % cfg.ckpt_every == 0 and done_steps < cfg.steps:
                    run.checkpoint(done_steps)
                # a stop request is agreed on by all ranks; with several ranks that costs a
                # collective, so they compare notes only at logging steps
                if (not dist.is_distributed() or done_steps % cfg.log_every == 0) and dist.any_rank(flag.stop, device):
                    run.checkpoint(done_steps)
                    raise KeyboardInterrupt
        return run.finish(loop_start)
    except KeyboardInterrupt:
        run.tracker.end("KILLED")
        raise
    except BaseException:
        run.tracker.end("FAILED")
        raise
    finally:
        if bar is not None:
            bar.close()


def _progress(cfg: Any, start: int, is_main: bool) -> Any:
    if not (cfg.progress and is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
