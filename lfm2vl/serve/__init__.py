"""OpenAI-compatible HTTP server for lfm2vl: `lfm2vl serve --model M`.

- schemas.py   pydantic request/response models of /v1/chat/completions
- media.py     image_url parts -> PIL images (data: URLs, http(s) with limits, local files under one folder)
- translate.py OpenAI request -> engine messages + options; events -> response bodies and SSE chunks
- scheduler.py the one thread that owns the model's BatchGenerator (continuous batching)
- errors.py    OpenAI's error shape and the exception handlers
- app.py       FastAPI routes, API-key and body-size guard
- cli.py       `main(argv)`: argument parsing, model loading, uvicorn
"""
