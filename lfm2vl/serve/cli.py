"""`lfm2vl serve`: load a model and serve it over an OpenAI-compatible HTTP API.

    lfm2vl serve [--model M] [--host 127.0.0.1] [--port 8000] [--api-key K] [--max-batch 16]
    python -m lfm2vl.serve.cli ...   (the same)

Without --model the model follows resolve.py's default rules ($LFM2VL_MODEL, LiquidAI/LFM2-VL-450M when it is cached
or the hub is reachable, else the bundled demo model, served as `bundled`).

Clients send images as data: URLs; http(s) image URLs are fetched only with --allow-remote-images (then only from
public addresses, within --remote-timeout; see media.py), local files only under --allowed-media-dir.

The socket is bound before uvicorn starts, so `--port 0` picks a free port and the startup line prints the real
address. Ctrl-C stops accepting connections, lets running answers finish for a few seconds, then stops the
scheduler thread and exits with status 0.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys


API_KEY_ENV = "LFM2VL_API_KEY"
DEFAULT_CONTEXT = 4096  # tokens per request (prompt + completion) unless --max-seq-len or the model says less


def build_parser() -> argparse.ArgumentParser:
    from lfm2vl.cli.args import HelpFormatter, add_weight_formats
    from lfm2vl.generate.options import MAX_BATCH, PREFILL_CHUNK

    p = argparse.ArgumentParser(prog="lfm2vl serve", description="OpenAI-compatible server for LFM2-VL models.",
                                formatter_class=HelpFormatter)
    from lfm2vl.resolve import ORDER_HELP

    p.add_argument("--model", default=None, help=ORDER_HELP)
    p.add_argument("--served-model-name", default=None,
                   help="the name clients use in 'model' (default: the folder name of the model, `bundled` for the "
                        "bundled demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api-key", default=None,
                   help=f"require `Authorization: Bearer KEY` on /v1/*; printable ASCII without spaces, as an HTTP "
                        f"header carries it (default: ${API_KEY_ENV} if set and not empty, else no key)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="weights and activations (default: the engine's, bfloat16)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the engine's choice)")
    add_weight_formats(p)
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="LoRA adapter folder (PEFT's format, e.g. from `lfm2vl finetune`), merged into the weights at "
                        "load (default: none)")
    p.add_argument("--low-memory", action="store_true", help="keep the vision tower's and the language model's "
                   "weights out of memory together (lower peak RSS, slower image requests)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=MAX_BATCH, help="rows decoded together (concurrent requests)")
    g.add_argument("--max-seq-len", type=int, default=None,
                   help=f"context per request: prompt + completion tokens (default: {DEFAULT_CONTEXT}, or the model's "
                        "context if it is shorter)")
    g.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                   help="prompt tokens prefilled per step, so a long prompt does not stall running answers")
    g.add_argument("--max-tokens", type=int, default=1024, help="completion tokens when a request sets no max_tokens")
    m = p.add_argument_group("requests and images")
    m.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (413 above)")
    m.add_argument("--max-images", type=int, default=8, help="images per request")
    m.add_argument("--max-image-pixels", type=int, default=32 * 1024 * 1024, help="width*height per image")
    m.add_argument("--max-image-mb", type=float, default=20.0, help="encoded bytes per image")
    m.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (off by default: clients send data: URLs). Only public addresses "
                   "are fetched (checked after DNS and after every redirect; no loopback, private, link-local or "
                   "metadata addresses), and every failure gives the client the same short error")
    m.add_argument("--remote-timeout", type=float, default=10.0,
                   help="seconds allowed for a request's remote images, all of DNS, connect, TLS, redirects and body")
    m.add_argument("--allowed-media-dir", default=None,
                   help="allow local image paths (and file:// URLs), only inside this folder")
    p.add_argument("--no-ui", action="store_true", help="no chat page at / (the API only)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log detail")
    return p


def _check(args) -> str | None:
    """The flag values that can be checked before the model loads; returns the problem, or None. A missing --api-key
    is taken from $LFM2VL_API_KEY here (an empty one means no key)."""
    where = "--api-key"
    if args.api_key is None and os.environ.get(API_KEY_ENV):
        args.api_key, where = os.environ[API_KEY_ENV], f"${API_KEY_ENV}"
    for name in ("max_batch", "max_seq_len", "prefill_chunk", "max_tokens", "max_images", "max_image_pixels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {value}"
    for name in ("max_body_mb", "max_image_mb", "remote_timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            return f"--{name.replace('_', '-')} must be a positive number, got {value}"
    if args.api_key is not None:
        problem = api_key_problem(args.api_key, where)
        if problem:
            return problem
    if not args.host.strip():
        return "--host is empty; give an address (127.0.0.1: this machine only, 0.0.0.0: every interface)"
    if args.served_model_name is not None and not args.served_model_name.strip():
        return "--served-model-name is empty; give the name clients send as 'model', or leave the flag out"
    if not 0 <= args.port <= 65535:
        return f"--port must be in 0..65535, got {args.port}"
    if args.adapter is not None and not os.path.isdir(args.adapter):
        return f"--adapter {args.adapter!r} is not a folder"
    if args.allowed_media_dir is not None and not os.path.isdir(args.allowed_media_dir):
        return f"--allowed-media-dir {args.allowed_media_dir!r} is not a folder"
    return None


def api_key_problem(key: str, where: str) -> str | None:
    """What is wrong with an API key given by `where` (a flag or an environment variable), or None. A client sends
    the key in an HTTP header (`Authorization: Bearer KEY`), whose value holds no control characters and loses
    leading and trailing spaces, and clients encode it as ASCII: a key is printable ASCII without spaces."""
    unset = "leave the flag out" if where.startswith("--") else f"unset {where.lstrip('$')}"
    if not key.strip():
        return f"{where} is empty; give a key, or {unset} to serve without one"
    bad = next((k for k, c in enumerate(key) if not "!" <= c <= "~"), None)
    if bad is not None:
        return (f"{where} has {key[bad]!r} at position {bad + 1}; a key is printable ASCII without spaces or control "
                "characters (clients send it in an HTTP header)")
    return None


def _fit(args, engine) -> str | None:
    """Fix the row length to the model and check the cache fits in memory; returns the problem, or None."""
    context = engine.config.text_config.max_position_embeddings
    if args.max_seq_len is None:
        args.max_seq_len = min(DEFAULT_CONTEXT, context)
    elif args.max_seq_len > context:
        return f"--max-seq-len {args.max_seq_len} is longer than the model's context ({context} tokens)"
    need = cache_bytes(engine, args.max_batch, args.max_seq_len)
    have = physical_memory()
    if have and need > have // 2:
        return (f"--max-batch {args.max_batch} rows of --max-seq-len {args.max_seq_len} tokens need a "
                f"{need / 2**30:.1f} GiB cache, over half of this machine's {have / 2**30:.1f} GiB of memory; "
                "lower --max-batch or --max-seq-len")
    return None


def cache_bytes(engine, rows: int, seq_len: int) -> int:
    """Bytes of the KV and conv cache the scheduler allocates for `rows` rows of `seq_len` tokens."""
    tc = engine.config.text_config
    n_attn = sum(t == "full_attention" for t in tc.layer_types)
    item = engine.dtype.itemsize
    kv = 2 * n_attn * tc.num_key_value_heads * seq_len * tc.head_dim
    conv = (len(tc.layer_types) - n_attn) * tc.hidden_size * (tc.conv_L_cache - 1)
    return rows * (kv + conv) * item


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def served_names(label: str, override: str | None) -> tuple[str, tuple[str, ...]]:
    """(the name /v1/models lists, other names requests may use): --served-model-name, else the model's folder name
    (`bundled` for the bundled demo model; LFM2-VL-450M for LiquidAI/LFM2-VL-450M, which stays an alias)."""
    name = override or os.path.basename(os.path.normpath(label)) or label
    return name, tuple({label} - {name})


def media_policy(args):
    """The MediaPolicy the flags ask for (a testing-only knob like `allowed_networks` has no flag)."""
    from .media import MediaPolicy

    return MediaPolicy(allow_remote=args.allow_remote_images, allowed_dir=args.allowed_media_dir,
                       max_bytes=int(args.max_image_mb * 1024 * 1024), max_pixels=args.max_image_pixels,
                       fetch_timeout_s=args.remote_timeout)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check(args)
    if problem:
        parser.error(problem)  # usage and one line, exit 2, like argparse's own errors
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from .app import ServerSettings, create_app
        from .scheduler import Scheduler
    except ImportError as e:
        print(f"lfm2vl serve needs the server extra ({e.name} is missing): pip install 'lfm2vl[serve]'",
              file=sys.stderr)
        return 1

    import lfm2vl

    from ..cli.commands import load_warnings
    from ..resolve import model_label, resolve_model, stderr_announcer

    try:
        model = resolve_model(args.model, announce=stderr_announcer("lfm2vl serve"))
    except ValueError as e:  # the bundled model is missing from this installation
        print(f"lfm2vl serve: {e}", file=sys.stderr)
        return 1
    label = model_label(model)
    print(f"lfm2vl serve: loading {label} ...", flush=True)
    try:
        with load_warnings("lfm2vl serve"):
            engine = lfm2vl.load(model, dtype=args.dtype, device=args.device, int8=args.int8,
                                 int4=args.int4, bf16_packed=args.bf16_packed, int8_vision=args.int8_vision,
                                 low_memory=args.low_memory, adapter=args.adapter)
    except Exception as e:  # offline without a copy, a broken folder...: one clear line, no traceback
        print(f"lfm2vl serve: could not load {label}: {e}", file=sys.stderr)
        return 1
    problem = _fit(args, engine)
    if problem:
        parser.error(problem)

    try:
        scheduler = Scheduler(engine, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                              prefill_chunk=args.prefill_chunk)
    except (ValueError, RuntimeError, MemoryError) as e:  # e.g. the cache does not fit after all
        print(f"lfm2vl serve: cannot allocate the batch cache: {e}", file=sys.stderr)
        return 1
    name, aliases = served_names(label, args.served_model_name)
    settings = ServerSettings(
        model_id=name, aliases=aliases, api_key=args.api_key,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_images=args.max_images,
        default_max_tokens=args.max_tokens, context_len=args.max_seq_len,
        max_image_tokens=engine.processor.settings.image.max_image_tokens,
        min_image_tokens=engine.processor.settings.image.min_image_tokens, ui=not args.no_ui,
        media=media_policy(args))
    app = create_app(engine, scheduler, settings)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"lfm2vl serve: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                key = "on" if args.api_key else "off"
                print(f"lfm2vl serve: model {name} ({label}) at http://{shown}:{port}/v1 "
                      f"(max batch {args.max_batch}, context {args.max_seq_len}, API key {key}); Ctrl-C stops",
                      flush=True)

    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5, access_log=False)
    try:
        _Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled, after its clean shutdown
    print("lfm2vl serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
