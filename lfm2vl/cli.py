"""The `lfm2vl` command (also `python -m lfm2vl`).

    lfm2vl describe IMAGE... [--prompt TEXT]          answer about one or more images, streamed
    lfm2vl chat [--image IMAGE] [--system TEXT]       interactive: /image PATH, /reset, /quit
    lfm2vl generate --messages FILE.json [--json]     one conversation (or a list of them) from a file
    lfm2vl serve ...  /  lfm2vl bench ...             dispatched to lfm2vl.serve.cli / lfm2vl.bench (imported lazily)

Common options: --model (folder or hub id, default LiquidAI/LFM2-VL-450M), --dtype, --device, the image knobs and
the sampling options (defaults from the model card). Errors the user can fix (no weights offline, a missing image,
bad JSON) print one sentence and exit with status 1, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

DELEGATED = {"serve": "lfm2vl.serve.cli", "bench": "lfm2vl.bench"}
DEFAULT_PROMPT = "Describe this image."


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def add_common(p: argparse.ArgumentParser) -> None:
    from .engine import DEFAULT_MODEL

    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder or hub id (default: %(default)s)")
    g.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="weights and activations (default: bfloat16)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cpu)")
    q = g.add_mutually_exclusive_group()
    q.add_argument("--int8", action="store_true", help="weight-only int8 linears (CPU; slightly different results)")
    q.add_argument("--int4", action="store_true", help="weight-only int4 linears, groups of 32 (CPU; smallest and "
                   "fastest decode, results differ more than int8)")
    g.add_argument("--no-optimize", action="store_true", help="keep plain torch modules (no CPU fast paths)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start)")
    g.add_argument("--low-memory", action="store_true",
                   help="keep the vision tower's and the language model's weights out of memory together (lower "
                        "peak RSS, slower image requests)")
    g = p.add_argument_group("images (defaults from the checkpoint's processor files)")
    g.add_argument("--min-image-tokens", type=int, default=None)
    g.add_argument("--max-image-tokens", type=int, default=None)
    g.add_argument("--no-image-splitting", action="store_true", help="never cut large images into tiles")
    g = p.add_argument_group("sampling (defaults from the model card)")
    g.add_argument("--max-new-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: 0.1)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None, help="(default: 0.15)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="(default: 1.05)")
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lfm2vl", description="Run Liquid AI's LFM2-VL vision-language models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("describe", help="answer a prompt about one or more images (streamed)")
    d.add_argument("images", nargs="+", metavar="IMAGE", help="image path or URL")
    d.add_argument("--prompt", default=DEFAULT_PROMPT, help="(default: %(default)r)")
    add_common(d)
    c = sub.add_parser("chat", help="interactive conversation (/image PATH, /reset, /quit)")
    c.add_argument("--image", action="append", default=[], help="attach an image to the first message")
    c.add_argument("--system", default=None, help="system prompt")
    add_common(c)
    g = sub.add_parser("generate", help="generate for the conversation(s) in a JSON file")
    g.add_argument("--messages", required=True, metavar="FILE.json",
                   help="a list of messages, or a list of such lists (a batch); '-' reads stdin")
    g.add_argument("--json", action="store_true", help="print the result(s) as JSON")
    add_common(g)
    sub.add_parser("serve", help="OpenAI-compatible HTTP server (lfm2vl serve --help)", add_help=False)
    sub.add_parser("bench", help="speed benchmark (lfm2vl bench --help)", add_help=False)
    return p


def options(args) -> dict:
    """Engine options from the parsed arguments (unset ones keep the engine's defaults)."""
    opts = {"max_new_tokens": args.max_new_tokens, "min_image_tokens": args.min_image_tokens,
            "max_image_tokens": args.max_image_tokens}
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "stop"):
        opts[name] = getattr(args, name)
    if args.no_image_splitting:
        opts["do_image_splitting"] = False
    return {k: v for k, v in opts.items() if v is not None}


def load_engine(args):
    """Load with a progress bar over the weight bytes; user-fixable load errors become a CLIError."""
    from tqdm import tqdm

    from .engine import load
    from .loading import LoadError

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", file=sys.stderr,
                       leave=False)
        bar.update(done - bar.n)

    try:
        return load(args.model, dtype=args.dtype, device=args.device, int8=args.int8, int4=args.int4,
                    optimize=not args.no_optimize, compile=args.compile, low_memory=args.low_memory,
                    progress=progress)
    except (LoadError, OSError, ValueError) as e:
        if not Path(args.model).exists() and str(e).startswith("could not get hub model"):
            raise CLIError(f"model {args.model!r} is not in the local Hugging Face cache and cannot be downloaded "
                           f"(offline?); fetch it where there is network access with `huggingface-cli download "
                           f"{args.model} --local-dir DIR` and run with --model DIR") from None
        raise CLIError(f"cannot load model {args.model!r}: {str(e).splitlines()[0]}") from None
    finally:
        if bar is not None:
            bar.close()


def stream_to(out, stream) -> None:
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()


def cmd_describe(args) -> int:
    for im in args.images:
        if "://" not in im and not im.startswith("data:") and not Path(im).is_file():
            raise CLIError(f"image {im!r} does not exist")
    engine = load_engine(args)
    stream_to(sys.stdout, engine.stream(args.prompt, images=args.images, **options(args)))
    return 0


def cmd_generate(args) -> int:
    try:
        text = sys.stdin.read() if args.messages == "-" else Path(args.messages).read_text()
    except OSError as e:
        raise CLIError(f"cannot read {args.messages}: {e.strerror}") from None
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise CLIError(f"{args.messages} is not valid JSON ({e})") from None
    if isinstance(messages, dict) and "messages" in messages:  # an OpenAI request body
        messages = messages["messages"]
    engine = load_engine(args)
    batch = isinstance(messages, list) and bool(messages) and all(isinstance(m, list) for m in messages)
    if not args.json and not batch:
        stream_to(sys.stdout, engine.stream(messages, **options(args)))
        return 0
    results = engine.generate(messages, **options(args))
    results = results if batch else [results]
    if args.json:
        rows = [result_dict(r) for r in results]
        print(json.dumps(rows if batch else rows[0], ensure_ascii=False, indent=2))
    else:
        for r in results:
            print(r.text)
    return 0


def result_dict(r) -> dict:
    return {"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "cached_tokens": r.cached_tokens, "ttft_s": round(r.ttft_s, 6), "prefill_tps": round(r.prefill_tps, 3),
            "decode_tps": round(r.decode_tps, 3)}


CHAT_HELP = "Commands: /image PATH (attach to your next message), /reset, /quit"


def cmd_chat(args) -> int:
    engine = load_engine(args)
    chat = engine.chat(system=args.system, **options(args))
    pending = list(args.image)
    interactive = sys.stdin.isatty()
    print(CHAT_HELP, file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            chat.reset()
            pending = []
            print("(conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not path or ("://" not in path and not Path(path).is_file()):
                print(f"(no such image: {path!r})" if path else "(usage: /image PATH)", file=sys.stderr)
            else:
                pending.append(path)
                print(f"(attached {path})", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"(unknown command {line.split()[0]}; {CHAT_HELP})", file=sys.stderr)
            continue
        try:
            stream_to(sys.stdout, chat.stream(line, images=pending or None))
        except ValueError as e:  # e.g. an unreadable image: report it and keep the conversation going
            print(f"(error: {e})", file=sys.stderr)
        pending = []
    return 0


COMMANDS = {"describe": cmd_describe, "chat": cmd_chat, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except CLIError as e:
        print(f"lfm2vl: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad input the engine rejected (options, messages, images)
        print(f"lfm2vl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
