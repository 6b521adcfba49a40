"""The distillation library: loss maths, divergences, masking, models, the training schedule, checkpoints,
evaluation, the teacher cache, teacher vocabularies, corpus preprocessing and student extraction.
`distil.distributed` holds what only multi-process runs need. The loop (distiller.py) and the command lines
(train.py, scripts/) sit at the repository root and import from here; nothing here imports them."""
