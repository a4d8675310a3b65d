"""A run directory: everything needed to evaluate, generate from, resume or fine-tune a training run.

    config.json          task, task_spec, model config, resolved training arguments, fine-tuning method
    model.safetensors    the weights (safetensors: loading never unpickles anything)
    trainer_state.pt     step, optimizer, grad scaler and log accumulators (tensors and plain data only,
                         loaded with ``torch.load(weights_only=True)``)
    tokenizer.json       written by the task
    metrics.jsonl / metrics.json / loss.png   written by the trainer

Corrupt or mismatched files raise ``CheckpointError`` (a ``ValueError``) saying which file and why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = 1
CONFIG, WEIGHTS, STATE = "config.json", "model.safetensors", "trainer_state.pt"


class CheckpointError(ValueError):
    pass


def _atomic(path: Path, write) -> None:
    """Write through a temporary file and rename, so Ctrl-C mid-write never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_config(directory: Path, config: dict[str, Any]) -> None:
    text = json.dumps({"format": FORMAT, **config}, indent=2, sort_keys=True)
    _atomic(directory / CONFIG, lambda p: p.write_text(text))


def load_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a run directory: {CONFIG} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e
    missing = {"format", "task", "task_spec", "model"} - set(config)
    if missing or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a config of this trainer (format {FORMAT}); missing {sorted(missing)}")
    return config


def save_weights(directory: Path, state_dict: dict[str, torch.Tensor]) -> None:
    # Tied weights appear under two names sharing storage; safetensors refuses shared storage, so
    # each name gets its own copy (loading puts the same values back into the tied parameter).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    _atomic(directory / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": str(FORMAT)}))


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e


def check_weights(model_keys: dict[str, torch.Size], weights: dict[str, torch.Tensor], where: str) -> None:
    """The saved weights must be exactly the model's: same names, same shapes."""
    missing = sorted(set(model_keys) - set(weights))
    unexpected = sorted(set(weights) - set(model_keys))
    wrong = sorted(k for k in set(model_keys) & set(weights) if tuple(weights[k].shape) != tuple(model_keys[k]))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{name}: {keys[:5]}{' ...' if len(keys) > 5 else ''}"
                           for name, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise CheckpointError(f"{where}: the weights do not match the model ({detail})")


def save_state(directory: Path, state: dict[str, Any]) -> None:
    _atomic(directory / STATE, lambda p: torch.save(state, p))


def load_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE
    if not path.is_file():
        raise CheckpointError(f"{directory}: {STATE} is missing, so the run cannot be resumed "
                              f"(fine-tune from it with --init instead)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:          # truncated zip, or a pickle of arbitrary objects that weights_only refuses
        raise CheckpointError(f"{path} is corrupt or holds more than tensors and plain data: {e}") from e
    if not isinstance(state, dict) or not {"step", "optimizer"} <= set(state):
        raise CheckpointError(f"{path} is not a trainer state (needs 'step' and 'optimizer')")
    return state
