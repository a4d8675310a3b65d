"""A run directory: everything needed to evaluate, generate from, resume or fine-tune a training run.

    config.json          task, task_spec, model config, resolved training arguments, fine-tuning method
    checkpoint.json      the current checkpoint: its step, its directory and the size and SHA-256 of each file
    checkpoint-STEP/     model.safetensors (the weights; loading never unpickles anything) and
                         trainer_state.pt (step, optimizer, grad scaler and log accumulators: tensors and plain
                         data only, loaded with ``torch.load(weights_only=True)``)
    tokenizer.json       written by the task
    metrics.jsonl / metrics.json / loss.png   written by the trainer

A checkpoint is saved whole or not at all: both files go into a new directory, are flushed to disk, and only
then does one rename replace ``checkpoint.json`` (the switch); the previous checkpoint's directory is removed
after it. A save that fails (a full disk, a file-size limit, Ctrl-C) raises ``CheckpointError`` in one line
(which file, why) and leaves the previous checkpoint as it was. Loading checks each file against
``checkpoint.json`` and refuses a torn or tampered checkpoint.

A directory holding ``model.safetensors`` itself (no ``checkpoint.json``: a run written before checkpoints had
a manifest, or weights put there by hand) still loads its weights for evaluation and ``--init``; it cannot be
resumed, because nothing says its two files belong to the same step.

Corrupt or mismatched files raise ``CheckpointError`` (a ``ValueError``) saying which file and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT = 1
CONFIG, WEIGHTS, STATE, MANIFEST = "config.json", "model.safetensors", "trainer_state.pt", "checkpoint.json"
CHECKPOINT_PREFIX = "checkpoint-"
# Every name a run writes at its top level (``--overwrite`` removes these, and only these; WEIGHTS and STATE
# where a directory holds them itself).
RUN_FILES = (CONFIG, MANIFEST, WEIGHTS, STATE, "tokenizer.json", "metrics.jsonl", "metrics.json", "loss.png")


class CheckpointError(ValueError):
    pass


def _reason(error: BaseException) -> str:
    """Why a write failed, in a few words: the OS's text (e.g. 'No space left on device') when there is one."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _write(path: Path, data: bytes) -> None:
    """``data`` into ``path``, flushed to the disk before returning (a later rename must not outrun it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (where the platform allows opening a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename; on failure the temporary file is removed and the old file
    (if any) is left as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_config(directory: Path, config: dict[str, Any]) -> None:
    text = json.dumps({"format": FORMAT, **config}, indent=2, sort_keys=True)
    try:
        _atomic(directory / CONFIG, text.encode())
    except OSError as e:
        raise CheckpointError(f"could not write {directory / CONFIG}: {_reason(e)}") from None


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


def _digest(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _checkpoint_dirs(directory: Path) -> list[Path]:
    return [p for p in directory.glob(CHECKPOINT_PREFIX + "*") if p.is_dir()]


def save_checkpoint(directory: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Save the weights and the trainer state of ``step`` as one checkpoint (see the module docstring).
    Raises ``CheckpointError`` naming the file and the reason when a write fails; the previous checkpoint is
    then untouched and nothing of the failed one is left behind."""
    directory = Path(directory)
    # Tied weights appear under two names sharing storage; safetensors refuses shared storage, so each name
    # gets its own copy (loading puts the same values back into the tied parameter).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    files = {WEIGHTS: save_safetensors(tensors, metadata={"format": str(FORMAT)})}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files[STATE] = buffer.getvalue()
    name = f"{CHECKPOINT_PREFIX}{step}"
    n = 1
    while (directory / name).exists():   # the same step saved again (Ctrl-C right after an evaluation's save)
        name, n = f"{CHECKPOINT_PREFIX}{step}.{n}", n + 1
    staging = directory / f".{name}.partial"
    manifest = {"format": FORMAT, "step": step, "directory": name, "files": {k: _digest(v) for k, v in files.items()}}
    try:
        previous = _read_manifest(directory)
    except CheckpointError:
        previous = None
    target = staging
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for file, data in files.items():
            target = staging / file
            _write(target, data)
        target = directory / name
        os.replace(staging, target)
        _sync_dir(directory)
        target = directory / MANIFEST
        _atomic(target, json.dumps(manifest, indent=2).encode())     # the switch: one rename
        _sync_dir(directory)
    except BaseException as e:   # a full disk, a file-size limit, Ctrl-C: the previous checkpoint stays current
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_current(directory, name):
            shutil.rmtree(directory / name, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        kept = f"the checkpoint of step {previous['step']} is kept" if previous else "no earlier checkpoint"
        raise CheckpointError(f"could not save the checkpoint of step {step}: writing {target}: {_reason(e)} "
                              f"({kept})") from None
    for old in _checkpoint_dirs(directory):       # only now: the previous checkpoint's files, and stale partials
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(f".{CHECKPOINT_PREFIX}*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e
    if not isinstance(manifest, dict) or not {"step", "directory", "files"} <= set(manifest):
        raise CheckpointError(f"{path} is not a checkpoint manifest (needs 'step', 'directory' and 'files')")
    return manifest


def _is_current(directory: Path, name: str) -> bool:
    try:
        manifest = _read_manifest(directory)
    except CheckpointError:
        return False
    return manifest is not None and manifest["directory"] == name


def checkpoint_step(directory: str | Path) -> int | None:
    """The step of the run's current checkpoint (None: none yet, or the layout without a manifest)."""
    manifest = _read_manifest(Path(directory))
    return None if manifest is None else int(manifest["step"])


def _read_verified(directory: Path, file: str, need_manifest: bool) -> bytes:
    """The bytes of ``file`` of the current checkpoint, checked against checkpoint.json (size and SHA-256)."""
    manifest = _read_manifest(directory)
    if manifest is None:
        legacy = directory / file
        if need_manifest:
            raise CheckpointError(
                f"{directory} has no {MANIFEST}, so nothing says which step its files belong to and it cannot be "
                f"resumed (a run written before checkpoints had a manifest?); fine-tune from it with --init, or "
                f"evaluate it")
        if not legacy.is_file():
            raise CheckpointError(f"{directory}: {file} is missing (no checkpoint saved?)")
        return legacy.read_bytes()
    path = directory / manifest["directory"] / file
    want = manifest["files"].get(file)
    how = (f"the checkpoint of step {manifest['step']} is torn or was modified: it cannot be used (start again "
           f"with --overwrite, or restore the file)")
    if want is None:
        raise CheckpointError(f"{directory / MANIFEST} lists no {file}; {how}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: {_reason(e)}; {how}") from None
    got = _digest(data)
    if got != want:
        raise CheckpointError(f"{path} does not match {MANIFEST} ({got['bytes']} bytes, sha256 {got['sha256'][:12]}"
                              f"... where {want['bytes']} bytes, {want['sha256'][:12]}... were saved); {how}")
    return data


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    data = _read_verified(directory, WEIGHTS, need_manifest=False)
    try:
        return load_safetensors(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: {WEIGHTS} is corrupt: {e}") from e


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


def load_state(directory: str | Path) -> dict[str, Any]:
    """The trainer state of the current checkpoint, verified; what ``--resume`` reads."""
    directory = Path(directory)
    data = _read_verified(directory, STATE, need_manifest=True)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:          # a pickle of arbitrary objects that weights_only refuses, or garbage
        raise CheckpointError(f"{directory}: {STATE} is corrupt or holds more than tensors and plain data: "
                              f"{e}") from e
    if not isinstance(state, dict) or not {"step", "optimizer"} <= set(state):
        raise CheckpointError(f"{directory}: {STATE} is not a trainer state (needs 'step' and 'optimizer')")
    if state["step"] != checkpoint_step(directory):
        raise CheckpointError(f"{directory}: {STATE} is of step {state['step']} but {MANIFEST} says "
                              f"{checkpoint_step(directory)}")
    return state


def describe(directory: str | Path) -> tuple[str, bool] | None:
    """(what ``directory`` holds that a new run would overwrite, in words; whether it is a run that ``--resume``
    can continue), or None: nothing of a run."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    config = directory / CONFIG
    if config.is_file():
        try:
            content = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            content = {}
        if isinstance(content, dict) and "task" in content and "train" in content:
            steps = content["train"].get("steps")
            try:
                done = checkpoint_step(directory)
            except CheckpointError:
                done = None
            if done is None:
                return f"a {content['task']} run (config.json, no checkpoint yet)", False
            state = "finished" if steps is not None and done >= steps else "unfinished"
            return f"a {state} {content['task']} run (step {done} of {steps})", True
        if isinstance(content, dict) and "model_type" in content:
            return f"a Hugging Face model ({content['model_type']}, config.json)", False
    found = [name for name in RUN_FILES if (directory / name).exists()] + sorted(
        p.name + "/" for p in _checkpoint_dirs(directory))
    return (f"files a run writes ({', '.join(found)})", False) if found else None


def clear(directory: str | Path) -> None:
    """Remove what a run writes in ``directory`` (``--overwrite``), and nothing else."""
    directory = Path(directory)
    for name in RUN_FILES:
        (directory / name).unlink(missing_ok=True)
    for path in _checkpoint_dirs(directory) + list(directory.glob(f".{CHECKPOINT_PREFIX}*.partial")):
        shutil.rmtree(path, ignore_errors=True)
