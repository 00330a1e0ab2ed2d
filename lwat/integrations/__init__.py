"""Thin adapters that run lwat inside training frameworks; each submodule imports its framework, this package none.

- `lwat.integrations.lightning.LayerwiseAdversarialTraining`: a `lightning.pytorch.Callback`.
- `lwat.integrations.huggingface.LayerwiseAdversarialCallback`: a `transformers.TrainerCallback`.

Both check their arguments when made, attach with `lwat.attach` when training starts, keep the perturbation cache in
the framework's own checkpoints (one cache per process, in `lwat.cache`'s format: the trainer's), pass a GradScaler's
loss scale to the handle, and detach at the end.
"""
