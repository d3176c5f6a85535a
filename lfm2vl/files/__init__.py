"""Files in and out: atomic writes (atomic.py), the check that an output path can be written (check.py), and JSON
text from outside read with a bound on its nesting (jsontext.py).

Imports nothing of lfm2vl: every layer that writes results (bench, eval, finetune, cpu) or reads JSON it is given
(the CLI, the processor, generate, eval, finetune) uses it."""
