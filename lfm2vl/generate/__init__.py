"""Generation: sampling, streaming detokenization, stop strings, the continuous-batching loop and a reference.

    sampling.py   SamplingParams + pure logit filters composed into a per-request Sampler
    detok.py      StreamDetokenizer: incremental text that never splits a character
    stops.py      StopMatcher: user stop strings, partial matches held back while streaming
    batch.py      BatchGenerator: the one decode loop (admission into free rows, chunked prefill, batched decode)
    steps.py      prefill / decode_step / compiled_decode: the model steps, shared with the benchmark
    rows.py       the cache rows: prefix reuse, conv snapshots, growth
    units.py      image units: pixel digests, token counts, features from a position on
    active.py     one running request's state: sampling, detokenising, stops, its Result
    options.py    the engine's option names, split_options (-> sampling, request, processor and prompt
                  options) and the batching defaults MAX_BATCH, PREFILL_CHUNK
    constraints.py  Constraint / TokenMatcher: JSON schema, regex, choices, Lark grammars (llguidance)
    toolcall.py   tools / tool_choice -> prompt tools and a call grammar; the answer -> OpenAI tool_calls
    stream.py     Stream: the text pieces of one request as an iterator
    reference.py  cache-free greedy generator used as the fast path's oracle
    chat.py       Chat: a conversation that keeps its cache between turns
"""
