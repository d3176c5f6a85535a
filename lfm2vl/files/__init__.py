"""What goes in and out: atomic writes (atomic.py), the check that an output path can be written (check.py), JSON
text from outside read with a bound on its nesting (jsontext.py), and the rules of an http(s) URL (urls.py).

Imports nothing of lfm2vl: every layer that writes results (bench, eval, finetune, cpu), reads JSON it is given
(the CLI, the processor, generate, eval, finetune) or takes a URL (eval's endpoints, the server's image fetches)
uses it."""
