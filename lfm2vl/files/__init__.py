"""Writing result files: atomic writes (atomic.py) and the check that an output path can be written (check.py).

Imports nothing of lfm2vl: every layer that writes results (bench, eval, finetune, cpu) uses it."""
