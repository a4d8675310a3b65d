"""Training the reference models: ``python -m transformer train|finetune|eval|generate|translate``.

A ``Task`` (``task.py``) owns the data, the tokenizer, the model, the loss and the held-out metrics;
``trainer.train`` runs any task with AdamW, warm-up + cosine decay, clipping, accumulation, mixed
precision, DDP/FSDP, progress, evaluation, checkpoints and resume.
"""
