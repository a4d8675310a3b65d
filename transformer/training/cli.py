"""``python -m transformer {train,finetune,eval,generate,translate} ...``; ``--help`` on each explains it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

import fused_kernels

from .checkpoint import CheckpointError
from .task import get_task
from .trainer import METHODS, PRECISIONS, TrainArgs, TrainingDiverged, TrainingInterrupted, load_run, train

TASK_NAMES = ("gpt", "bert", "bert-cls", "seq2seq", "vit", "multimodal")
BACKENDS = ("auto", "triton", "torch")


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="model preset (default: the task's)")
    p.add_argument("--data", help="built-in dataset name or a file path (default: the task's built-in data)")
    p.add_argument("--steps", type=int, help="optimizer steps in all (a resumed run continues up to it)")
    p.add_argument("--batch-size", type=int, help="global batch of one micro-step, split over processes")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default: steps/20, at most 100)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="max global gradient norm (default 1.0)")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default steps/5)")
    p.add_argument("--eval-batches", type=int, help="batches per periodic evaluation (the final one uses all)")
    p.add_argument("--eval-batch-size", type=int, help="batch size of the evaluations (default: --batch-size)")
    p.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines (default 10)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 autocast on a GPU, fp32 on the CPU")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory (default runs/TASK); one holding a run is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run (or the files a run writes) already in --out")
    p.add_argument("--fsdp", action="store_true", default=None, help="shard the model with FSDP (under torchrun)")
    p.add_argument("--context-parallel", type=int, metavar="N",
                   help="gpt under torchrun: groups of N ranks split every sequence (ring attention, zigzag layout); "
                        "data parallel across the groups")
    p.add_argument("--backend", choices=BACKENDS,
                   help="fused_kernels backend: auto (Triton on a GPU, PyTorch ops on the CPU), triton, torch")
    p.add_argument("--threads", type=int,
                   help="intra-op CPU threads (default: 1 on the CPU unless OMP_NUM_THREADS is set; torch's on a GPU)")
    p.add_argument("--tokenizer", choices=("char", "bpe"), help="text tasks: the tokenizer to train")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a task option (repeatable), e.g. --option bpe_vocab=2048")
    p.add_argument("--model", type=_option, action="append", default=[], metavar="KEY=VALUE", dest="model_overrides",
                   help="a model config field over the preset's (repeatable), e.g. --model dropout=0")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _train_args(ns: argparse.Namespace, **extra: Any) -> TrainArgs:
    options = dict(ns.option)
    if ns.tokenizer:
        options["tokenizer"] = ns.tokenizer
    fields = {f: getattr(ns, f) for f in TrainArgs.__dataclass_fields__ if hasattr(ns, f)}
    return TrainArgs(**{**fields, **extra, "task_options": options or None,
                        "model_overrides": dict(ns.model_overrides) or None})


DESCRIPTION = ("Train, fine-tune, evaluate and use the reference models (GPT, BERT, the encoder-decoder, ViT, "
               "multimodal) on built-in offline data or your own files. "
               "'python -m transformer COMMAND --help' explains each command.")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m transformer", description=DESCRIPTION)
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from scratch (or --resume a run)",
                       description="Train a reference model; writes config.json, the checkpoint (checkpoint.json and "
                                   "checkpoint-STEP/: weights and trainer state), metrics.json(l), loss.png to "
                                   "--out and prints the held-out result.")
    p.add_argument("task", nargs="?", choices=TASK_NAMES, help="what to train (optional with --resume)")
    p.add_argument("--resume", help="a run directory to continue (Ctrl-C saves one)")
    _training_flags(p)

    p = sub.add_parser("finetune", help="fine-tune a trained run: full, LoRA or BitFit",
                       description="Start from the weights of --init (a run of ours) and train the task's fine-tuning "
                                   "job (bert: sequence classification) with the chosen method.")
    p.add_argument("task", choices=TASK_NAMES)
    p.add_argument("--init", required=True, help="the run directory to start from")
    p.add_argument("--method", choices=METHODS, default="full")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=float)
    _training_flags(p)

    p = sub.add_parser("eval", help="held-out metrics of a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="evaluate on another dataset (same tokenizer)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=BACKENDS)

    p = sub.add_parser("generate", help="continue a prompt with a trained gpt run")
    p.add_argument("run")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", metavar="FILE",
                   help="continue every line of FILE instead of --prompt, with continuous batching on the paged KV "
                        "cache; prints one continuation per line, in input order (newlines as \\n, backslashes "
                        "doubled); prompt + --max-new-tokens must fit the model's context")
    p.add_argument("--max-batch", type=int, default=8, help="with --prompts: sequences decoded together")

    p = sub.add_parser("translate", help="translate sentences with a trained seq2seq run")
    p.add_argument("run")
    p.add_argument("text", nargs="*", help="sentences (default: one per line on stdin)")
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--device", default="cpu")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        if ns.command == "train":
            train(_train_args(ns))
        elif ns.command == "finetune":
            target = get_task(ns.task).finetune_task or ns.task
            train(_train_args(ns, task=target))
        elif ns.command == "eval":
            with fused_kernels.use_backend(ns.backend or fused_kernels.get_backend()):
                task, model = load_run(ns.run, ns.device, ns.data)
                with torch.no_grad():
                    metrics = task.evaluate(model, ns.batch_size, None)
                    examples = task.examples(model)
            print(json.dumps(metrics, indent=2))
            print("\n".join(examples))
        elif ns.command == "generate":
            task, model = load_run(ns.run, ns.device)
            _needs(task, "generate", ns.run)
            if ns.prompts:
                with open(ns.prompts, encoding="utf-8") as f:
                    prompts = f.read().splitlines()
                for text in task.generate_batch(model, prompts, max_new_tokens=ns.max_new_tokens,
                                                temperature=ns.temperature, top_k=ns.top_k, seed=ns.seed,
                                                max_batch=ns.max_batch):
                    print(text.replace("\\", "\\\\").replace("\n", "\\n"))
            else:
                print(task.generate(model, ns.prompt, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                                    top_k=ns.top_k, seed=ns.seed))
        elif ns.command == "translate":
            task, model = load_run(ns.run, ns.device)
            _needs(task, "translate", ns.run)
            sentences = ns.text or [line.strip() for line in sys.stdin if line.strip()]
            for source, target in zip(sentences, task.translate(model, sentences, num_beams=ns.beams)):
                print(f"{source}\t{target}")
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except (CheckpointError, ValueError, TrainingDiverged, OSError) as e:   # OSError: a full disk, a missing file
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _needs(task: Any, method: str, run: str) -> None:
    if not hasattr(task, method):
        raise ValueError(f"{run} is a {task.name!r} run, which cannot {method}")
