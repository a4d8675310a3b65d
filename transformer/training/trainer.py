"""The training loop every task shares.

AdamW (weight decay on matrices only), linear warm-up then cosine decay to a tenth of the peak rate,
gradient clipping, gradient accumulation, autocast (bf16 by default on a GPU; fp16 with a grad scaler),
DDP or FSDP under torchrun, a tqdm progress bar, held-out evaluation every ``eval_every`` steps and at the
end, checkpoints (``checkpoint.py``) at each evaluation, at the end and on Ctrl-C.

Determinism: the batch and the dropout of step s depend only on (seed, s), and a checkpoint holds the
optimizer, the scaler and the log accumulators, so a resumed run retraces the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

import fused_kernels

from .. import lora
from ..context_parallel import context_parallel, shard_sequence
from . import checkpoint as ckpt
from . import distributed
from .huggingface import is_hf_directory, load_hf_model
from .plot import plot_losses
from .task import Task, get_task

DEFAULTS: dict[str, Any] = dict(
    steps=200, batch_size=32, lr=1e-3, warmup=None, weight_decay=0.1, min_lr_ratio=0.1, grad_clip=1.0,
    grad_accum=1, eval_every=None, eval_batches=20, eval_batch_size=None, log_every=10, device="auto",
    precision="auto", seed=0, method="full", lora_r=8, lora_alpha=16.0, fsdp=False, backend=None, progress=True,
    task_options={}, model_overrides={}, threads=None, context_parallel=1, overwrite=False,
)
METHODS = ("full", "lora", "bitfit")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainArgs:
    """What a run is asked to do; None means "the task's default" (or, when resuming, the saved value)."""

    task: str | None = None
    preset: str | None = None
    data: str | None = None
    out: str | None = None
    overwrite: bool | None = None          # replace what a run left in ``out`` (else such an ``out`` is refused)
    resume: str | None = None              # a run directory to continue
    init: str | None = None                # a run directory whose weights start a fine-tuning run
    steps: int | None = None
    batch_size: int | None = None          # the global batch of one micro-step, split over the ranks
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float | None = None
    min_lr_ratio: float | None = None
    grad_clip: float | None = None
    grad_accum: int | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    eval_batch_size: int | None = None
    log_every: int | None = None
    device: str | None = None              # auto | cpu | cuda
    precision: str | None = None           # auto | fp32 | bf16 | fp16
    seed: int | None = None
    method: str | None = None              # full | lora | bitfit
    lora_r: int | None = None
    lora_alpha: float | None = None
    fsdp: bool | None = None
    backend: str | None = None             # kernels backend: auto | triton | torch
    progress: bool | None = None
    threads: int | None = None             # intra-op CPU threads (None: see cpu_threads)
    context_parallel: int | None = None    # ranks that split every sequence (ring attention); gpt only
    task_options: dict[str, Any] | None = None
    model_overrides: dict[str, Any] | None = None   # model config fields over the preset's, e.g. dropout


class TrainingDiverged(FloatingPointError):
    """The loss stopped being finite: what diverged, at which step, and what to change."""

    def __init__(self, step: int, loss: float, lr: float, precision: str) -> None:
        hint = f"lower --lr (it was {lr:.3g} at that step)"
        if precision == "fp16":     # fp16's range can overflow where bf16 / fp32 do not
            hint += ", or train in bf16 / fp32 (--precision)"
        super().__init__(f"the training diverged: the loss is {loss} at step {step}; {hint}")
        self.step = step


class TrainingInterrupted(Exception):
    """Ctrl-C during training: the checkpoint was saved; ``step`` steps are done."""

    def __init__(self, step: int, out: Path) -> None:
        super().__init__(f"interrupted after step {step}; checkpoint saved in {out} "
                         f"(continue with: python -m transformer train --resume {out})")
        self.step, self.out = step, out


# ------------------------------------------------------------------------------------------ resolution

def resolve(args: TrainArgs) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Fill every unset argument: given > saved (when resuming) > the task's defaults > ``DEFAULTS``.
    Returns the resolved arguments and the resumed run's config.json (or None)."""
    saved = ckpt.load_config(args.resume) if args.resume else None
    given = {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
    task = given.get("task") or (saved or {}).get("task")
    if task is None:
        raise ValueError("which task? pass one of the task names, or --resume a run directory")
    if saved and task != saved["task"]:
        raise ValueError(f"--resume {args.resume}: that run trained task {saved['task']!r}, not {task!r}")
    task_cls = get_task(task)
    unset = dict.fromkeys(f.name for f in dataclasses.fields(TrainArgs))
    base = {**unset, **DEFAULTS, "preset": task_cls.default_preset, **task_cls.defaults}
    run = {**base, **(saved["train"] if saved else {}), **given, "task": task}
    if saved:
        run["data"], run["task_options"] = saved["task_spec"].get("data"), saved["train"]["task_options"]
        run["init"] = saved["train"].get("init")
    fields = {f.name for f in dataclasses.fields(task_cls.config_class)}
    if unknown := sorted(set(run["model_overrides"]) - fields):
        raise ValueError(f"model overrides {unknown} are not {task_cls.config_class.__name__} fields")
    for name, value in run["model_overrides"].items():     # before the config's own checks do arithmetic on it
        if (why := task_cls.config_class.type_error(name, value)) is not None:
            raise ValueError(f"--model {name}: {why}")
    run["out"] = run.get("out") or args.resume or f"runs/{task}"
    run["overwrite"] = bool(args.overwrite)      # never inherited from the resumed run
    _check_out(run, args.resume)
    run["warmup"] = min(100, run["steps"] // 20) if run["warmup"] is None else run["warmup"]
    # None is "the default"; 0 is refused like every other count (_validate), as for --log-every
    run["eval_every"] = max(1, run["steps"] // 5) if run["eval_every"] is None else run["eval_every"]
    run["eval_batch_size"] = run["batch_size"] if run["eval_batch_size"] is None else run["eval_batch_size"]
    run["device"] = ("cuda" if torch.cuda.is_available() else "cpu") if run["device"] == "auto" else run["device"]
    if run["precision"] == "auto":
        gpu_bf16 = run["device"] == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        run["precision"] = "bf16" if gpu_bf16 else "fp32"
    _validate(run)
    return run, saved


def _check_out(run: dict[str, Any], resume: str | None) -> None:
    """Refuse an ``out`` that is a file, or that holds a run (or another model) a new run would replace,
    unless ``--overwrite``; resuming writes into its own directory."""
    out = Path(run["out"])
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory: name a directory for the run")
    if resume is not None and out.resolve() == Path(resume).resolve():
        if run["overwrite"]:
            raise ValueError(f"--overwrite and --resume {resume} exclude each other: --resume continues the run "
                             f"in {resume}, --overwrite starts a new one there")
        return
    held = ckpt.describe(out)
    if held is None or run["overwrite"]:
        return
    what, resumable = held
    again = f", or --resume {out} to continue it (with a larger --steps if it is finished)" if resumable else ""
    raise ValueError(f"{out} already holds {what}: pass --overwrite to replace it{again}, or choose another --out")


def _validate(run: dict[str, Any]) -> None:
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "eval_batch_size", "log_every"):
        if name == "eval_batches" and run[name] is None:           # the whole held-out split every time
            continue
        if not isinstance(run[name], int) or run[name] < 1:
            raise ValueError(f"{name} must be a positive integer, got {run[name]!r}")
    cp = run["context_parallel"]
    if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
        raise ValueError(f"context_parallel must be a positive integer, got {cp!r}")
    if cp > 1 and run["task"] != "gpt":
        raise ValueError(f"--context-parallel splits the sequences of causal language modelling: task 'gpt' only, "
                         f"not {run['task']!r}")
    if run["threads"] is not None and (not isinstance(run["threads"], int) or run["threads"] < 1):
        raise ValueError(f"threads must be a positive integer, got {run['threads']!r}")
    if not run["lr"] > 0:
        raise ValueError(f"lr must be > 0, got {run['lr']}")
    if run["method"] not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {run['method']!r}")
    if run["method"] != "full" and not run["init"]:
        raise ValueError(f"method {run['method']!r} fine-tunes a trained model: pass --init RUN_DIR")
    if run["precision"] not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {run['precision']!r}")
    if run["device"] not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {run['device']!r}")
    if run["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    check_backend(run["backend"], run["device"])


def check_backend(backend: str | None, device: str) -> None:
    """Refuse, before any work, a kernels backend that cannot run on ``device`` (``--backend triton`` or
    ``FUSED_KERNELS_BACKEND=triton`` on a CPU without the interpreter), rather than fail at the first op."""
    if backend is not None and backend not in fused_kernels._core.backend.BACKENDS:
        raise ValueError(f"backend must be one of {fused_kernels._core.backend.BACKENDS}, got {backend!r}")
    if (why := fused_kernels._core.backend.unavailable(device, backend)) is not None:
        source = f"--backend {backend}" if backend else f"kernels backend {fused_kernels.get_backend()!r} " \
            f"(--backend or FUSED_KERNELS_BACKEND)"
        raise ValueError(f"{source} on {device}: {why}")


def interpreter_note(backend: str | None, device: str) -> str | None:
    """The warning a run prints when its ops would run in Triton's interpreter (``TRITON_INTERPRET=1`` on the
    CPU): correct, but built for tests, not for training."""
    interpreted = fused_kernels._core.backend.INTERPRET
    if device != "cpu" or not interpreted or (backend or fused_kernels.get_backend()) == "torch":
        return None
    return ("note: TRITON_INTERPRET=1: the Triton kernels run in Triton's interpreter (NumPy, about 4 ms per "
            "kernel loop iteration), which is for tests; training this way takes minutes or more per step. "
            "Unset it, or pass --backend torch")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def backend_in_force(device: torch.device) -> str:
    """The kernels backend in force, with what "auto" resolves to on ``device`` (the banner's words)."""
    backend = fused_kernels.get_backend()
    if backend != "auto":
        return backend
    resolved = fused_kernels._core.backend.choose(torch.empty(0, device=device), "train")
    return f"auto: {'the Triton kernels' if resolved == 'triton' else 'the PyTorch ops'}"


def lr_at(step: int, run: dict[str, Any]) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``lr * min_lr_ratio``."""
    peak, warmup, steps = run["lr"], run["warmup"], run["steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    low = peak * run["min_lr_ratio"]
    return low + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (peak - low)


# --------------------------------------------------------------------------------------- model set-up

def apply_method(model: nn.Module, method: str, head: list[str], r: int, alpha: float) -> None:
    """Freeze for LoRA / BitFit; the parameters in ``head`` (new in fine-tuning: a task head) always train."""
    if method == "lora":
        lora.apply_lora(model, r=r, alpha=alpha)
    elif method == "bitfit":
        lora.apply_bitfit(model)
    params = dict(model.named_parameters())
    for name in head:
        params[name].requires_grad_(True)


def initial_weights(model: nn.Module, weights: dict[str, torch.Tensor], directory: str) -> list[str]:
    """Copy every weight of the run in ``directory`` that ``model`` shares (same name and shape); returns the
    names of the parameters that are new (a fine-tuning head)."""
    own = model.state_dict()
    wrong = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if wrong:
        raise ckpt.CheckpointError(f"--init {directory}: shapes differ for {wrong[:5]} (different model size?)")
    shared = {k: v for k, v in weights.items() if k in own}
    if not shared:
        raise ckpt.CheckpointError(f"--init {directory}: no weight of that run fits this model")
    model.load_state_dict(shared, strict=False)
    return sorted(n for n, _ in model.named_parameters() if n not in shared)


def build(task: Task, run: dict[str, Any], saved: dict[str, Any] | None) -> tuple[nn.Module, list[str]]:
    """The model of a fresh, resumed or fine-tuning run, weights loaded, method applied."""
    if saved is not None:                                        # resume: exactly the saved architecture
        model = task.build_model(task.config_class.from_dict(saved["model"]))
        head = saved.get("head", [])
        apply_method(model, run["method"], head, run["lora_r"], run["lora_alpha"])
        load_exact(model, run["resume"])
        return model, head
    if run["init"]:
        if is_hf_directory(run["init"]):
            source_model, weights = load_hf_model(run["init"], task.config_class)
        else:
            source_model, weights = ckpt.load_config(run["init"])["model"], ckpt.load_weights(run["init"])
        # the source's architecture; a task still sets what its data fixes (e.g. the number of labels)
        config = task.model_config(run["preset"], **{**source_model, **run["model_overrides"]})
        model = task.build_model(config)
        head = initial_weights(model, weights, run["init"])
    else:
        model, head = task.build_model(task.model_config(run["preset"], **run["model_overrides"])), []
    apply_method(model, run["method"], head, run["lora_r"], run["lora_alpha"])
    return model, head


def load_exact(model: nn.Module, directory: str) -> None:
    weights = ckpt.load_weights(directory)
    ckpt.check_weights({k: v.shape for k, v in model.state_dict().items()}, weights, str(directory))
    model.load_state_dict(weights)


def load_run(directory: str, device: str = "cpu", data: str | None = None) -> tuple[Task, nn.Module]:
    """A trained run, ready for evaluation or generation (eval mode, on ``device``); ``data`` evaluates it
    on another dataset with its own tokenizer."""
    saved = ckpt.load_config(directory)
    check_backend(None, torch.device(device).type)
    spec = {**saved["task_spec"], **({"data": data} if data is not None else {})}
    task = get_task(saved["task"])(directory=directory, **spec)
    train = saved["train"]
    model = task.build_model(task.config_class.from_dict(saved["model"]))
    apply_method(model, train["method"], saved.get("head", []), train["lora_r"], train["lora_alpha"])
    load_exact(model, directory)
    return task, model.to(device).eval()


# ------------------------------------------------------------------------------------------ the loop

@contextlib.contextmanager
def _evaluating(model: nn.Module, autocast) -> Iterator[None]:
    model.eval()
    try:
        with torch.no_grad(), autocast():
            yield
    finally:
        model.train()


def _shard(batch: dict[str, torch.Tensor], cp: distributed.ContextParallel,
           device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's part of a global batch: its data-parallel slice of the examples and, under context
    parallelism, its slice of every sequence (dim 1, zigzag layout) with the slice's global ``position_ids``."""
    out = {}
    for k, v in batch.items():
        if cp.dp_size > 1:
            if v.shape[0] % cp.dp_size:
                raise ValueError(f"the batch ({v.shape[0]}) must divide evenly over {cp.dp_size} data-parallel "
                                 f"replicas")
            per = v.shape[0] // cp.dp_size
            v = v[cp.dp_rank * per:(cp.dp_rank + 1) * per]
        if cp.size > 1:
            v, out["position_ids"] = shard_sequence(v, cp.size, cp.rank)
        out[k] = v.to(device, non_blocking=True)
    if "position_ids" in out:
        out["position_ids"] = out["position_ids"].to(device)
    return out


def check_context_parallel(cp: distributed.ContextParallel, model: nn.Module) -> None:
    """Refuse, before any step, a model whose sequences the rings cannot split."""
    if cp.size == 1:
        return
    length, parts = model.config.max_seq_len, 2 * cp.size
    if length % parts:
        raise ValueError(f"--context-parallel {cp.size}: the sequence length (max_seq_len {length}) must be "
                         f"divisible by {parts} (two zigzag chunks per rank)")
    if model.config.attn_dropout > 0:
        raise ValueError(f"--context-parallel: ring attention has no attention dropout; pass --model "
                         f"attn_dropout=0 (it is {model.config.attn_dropout})")


def cpu_threads(requested: int | None, device: str) -> int | None:
    """The intra-op thread count a run sets: ``requested`` (``--threads``) if given; else, on the CPU, one
    thread, unless ``OMP_NUM_THREADS`` is set (torch then follows it); on a GPU, torch's default (None).

    Why one on the CPU: torch's worker threads spin-wait for each other, so a run with one thread per
    core slows to a crawl as soon as another process takes a core (measured here: the README's Training
    section), while the small models these tasks train gain little from a second thread. One process
    per core (``torchrun --nproc_per_node``) is the way to use several cores."""
    if requested is not None:
        return requested
    if device != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    return 1


def train(args: TrainArgs) -> dict[str, Any]:
    """Run (or resume, or fine-tune) a training job; returns the final held-out metrics (also written to
    ``out/metrics.json``). Raises ``TrainingInterrupted`` after saving a checkpoint on Ctrl-C."""
    run, saved = resolve(args)
    threads, previous = cpu_threads(run["threads"], run["device"]), torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    info, device = distributed.setup(run["device"])
    try:
        backend = fused_kernels.use_backend(run["backend"]) if run["backend"] else contextlib.nullcontext()
        with backend:
            return _train(run, saved, info, device)
    finally:
        distributed.teardown()
        torch.set_num_threads(previous)


def _train(run: dict[str, Any], saved: dict[str, Any] | None, info: distributed.Dist,
           device: torch.device) -> dict[str, Any]:
    task_cls = get_task(run["task"])
    source = run["resume"] or run["init"]
    task = task_cls(data=run["data"], directory=source, **run["task_options"])
    torch.manual_seed(run["seed"])                                       # the initial weights
    model, head = build(task, run, saved)
    cp = distributed.context_parallel_group(info, run["context_parallel"])
    check_context_parallel(cp, model)
    model.to(device)
    wrapped = distributed.wrap(model, info, device, run["fsdp"])
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in trainable if p.dim() >= 2], "weight_decay": run["weight_decay"]},
              {"params": [p for _, p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=run["lr"], betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler(device.type, enabled=run["precision"] == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run["precision"])

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    out = Path(run["out"])
    step, pending, records = 0, [], []
    if saved is not None:
        state = ckpt.load_state(run["resume"])
        set_optimizer_state_dict(wrapped, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, pending = state["step"], list(state["pending"])
        log = Path(run["resume"]) / "metrics.jsonl"
        records = [r for r in map(json.loads, log.read_text().splitlines()) if r["step"] <= step] \
            if log.is_file() else []
        if step >= run["steps"]:
            raise ValueError(f"--resume {run['resume']}: the run already did {_count(step, 'step')}; pass --steps > "
                             f"{step}")
    elif info.is_main and run["overwrite"] and (held := ckpt.describe(out)) is not None:
        print(f"note: --overwrite: replacing {held[0]} in {out}")
        ckpt.clear(out)
    if info.is_main and (note := interpreter_note(run["backend"], device.type)):
        print(note)

    counts = lora.parameter_counts(model)
    config = {"task": run["task"], "task_spec": task.spec(), "model": model.config.to_dict(),
              "train": {k: v for k, v in run.items() if k not in ("resume", "out", "progress", "threads",
                                                                  "overwrite")},
              "head": head, "parameters": counts}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.save_config(out, config)
        task.save(out)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{run['task']}: {counts['total']:,} parameters ({counts['trainable']:,} trainable), "
              f"{_count(run['steps'], 'step')} of {run['batch_size']} on {device}"
              f"{f' x {info.world_size} processes' if info.enabled else ''}, {run['precision']}, "
              f"kernels backend {backend_in_force(device)}, {_count(torch.get_num_threads(), 'CPU thread')}")

    def record(r: dict[str, Any]) -> None:
        records.append(r)
        if info.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")

    def save() -> None:
        msd, osd = get_state_dict(wrapped, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if info.is_main:   # weights and state as one checkpoint: whole, or the previous one stays
            ckpt.save_checkpoint(out, step, msd, {"step": step, "optimizer": osd, "pending": pending,
                                                  "scaler": scaler.state_dict() if scaler.is_enabled() else None})

    plain: list[nn.Module] = []

    def on_one_device(fn):
        """Run ``fn(model)`` for evaluation. Under FSDP generation calls more than ``forward``, which the
        sharded model cannot serve, so rank 0 runs it on a full copy (evaluation, unlike training, needs
        the model to fit one device) and shares the result."""
        if not run["fsdp"]:
            with _evaluating(model, autocast):
                return fn(model)
        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        result = [None]
        if info.is_main:
            if not plain:
                plain.append(task.build_model(model.config))
                apply_method(plain[0], run["method"], head, run["lora_r"], run["lora_alpha"])
                plain[0].to(device)
            plain[0].load_state_dict(full)
            with _evaluating(plain[0], autocast):
                result = [fn(plain[0])]
        return distributed.broadcast(result, info)[0]

    def evaluate(max_batches: int | None) -> dict[str, float]:
        return on_one_device(lambda m: task.evaluate(m, run["eval_batch_size"], max_batches))

    bar = tqdm(total=run["steps"], initial=step, disable=not (info.is_main and run["progress"]),
               unit="step", dynamic_ncols=True, desc=run["task"])
    accum, units, t0, start_time = run["grad_accum"], 0, time.perf_counter(), time.perf_counter()
    final: dict[str, Any] = {}
    try:
        while step < run["steps"]:
            lr = lr_at(step, run)
            for g in opt.param_groups:
                g["lr"] = lr
            step_loss = 0.0
            for micro in range(accum):
                seed = run["seed"] * 1_000_003 + step * accum + micro
                batch = _shard(task.train_batch(torch.Generator().manual_seed(seed), run["batch_size"]), cp, device)
                torch.manual_seed(seed + 7919 * info.rank)               # dropout
                no_sync = info.enabled and not run["fsdp"] and micro < accum - 1
                ring = context_parallel(cp.group) if cp.size > 1 else contextlib.nullcontext()
                with (wrapped.no_sync() if no_sync else contextlib.nullcontext()), autocast(), ring:
                    loss, n = task.loss(wrapped, batch)
                scaler.scale(loss / accum).backward()
                step_loss += loss.item() / accum
                units += n
            if not math.isfinite(step_loss):
                raise TrainingDiverged(step + 1, step_loss, lr, run["precision"])
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], run["grad_clip"])
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            pending.append(step_loss)
            bar.update(1)
            if step % run["log_every"] == 0 or step == run["steps"]:
                elapsed = time.perf_counter() - t0
                rate = units * info.world_size / max(elapsed, 1e-9)
                train_loss = distributed.mean(sum(pending) / len(pending), info, device)
                record({"step": step, "train_loss": train_loss, "lr": lr, f"{task.unit}_per_s": rate})
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", **{f"{task.unit}/s": f"{rate:,.0f}"})
                pending, units, t0 = [], 0, time.perf_counter()
            if step % run["eval_every"] == 0 or step == run["steps"]:
                last = step == run["steps"]
                metrics = evaluate(None if last else run["eval_batches"])
                record({"step": step, **metrics})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if last:
                    final = metrics
                save()
                t0 = time.perf_counter()
    except KeyboardInterrupt:
        bar.close()
        save()
        raise TrainingInterrupted(step, out) from None
    bar.close()

    last_train = next((r["train_loss"] for r in reversed(records) if "train_loss" in r), None)
    final = {**final, "step": step, "train_loss": last_train,
             "trainable_parameters": counts["trainable"], "total_parameters": counts["total"],
             "method": run["method"], "wall_s": round(time.perf_counter() - start_time, 1)}
    examples = on_one_device(task.examples)
    if info.is_main:
        (out / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        plot_losses(records, out / "loss.png", f"{run['task']} ({run['preset']}, {_count(run['steps'], 'step')})",
                    task.loss_labels(model.config))
        print("held-out: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in final.items()))
        if examples:
            print("examples:\n" + "\n".join(examples))
        print(f"saved to {out}")
    return final
