"""The `lfm2vl` command (also `python -m lfm2vl`).

    lfm2vl describe IMAGE... [--prompt TEXT]          answer about one or more images, streamed
    lfm2vl chat [--image IMAGE] [--system TEXT]       interactive: /image PATH, /reset, /quit
    lfm2vl generate --messages FILE.json [--json]     one conversation (or a list of them) from a file
    lfm2vl serve ...  /  lfm2vl bench ...             dispatched to lfm2vl.serve.cli / lfm2vl.bench (imported lazily)
    lfm2vl finetune ...                               dispatched to lfm2vl.finetune.cli (imported lazily)
    lfm2vl merge --model M --adapter DIR --output OUT write the checkpoint with a LoRA adapter merged (finetune/merge.py)
    lfm2vl eval ...                                   dispatched to lfm2vl.eval.cli (benchmark predictions and scores)
    lfm2vl --version

Common options: --model (folder, hub id or `bundled`; default: $LFM2VL_MODEL, else LiquidAI/LFM2-VL-450M when it is
cached or the hub is reachable, else the bundled demo model with a one-line note; see resolve.py), --dtype, --device,
the image knobs and the sampling options (defaults from the model card). Option values, the device, local image paths and the
messages are checked before the model loads. Errors the user can fix (a bad option value, no weights offline, a
missing image, bad JSON) print one line and exit with status 1 (2 for option errors), without a traceback.
In `chat`, Ctrl-C stops the answer being written and returns to the prompt; Ctrl-C or Ctrl-D at the prompt ends.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import sys
import warnings
from pathlib import Path

DELEGATED = {"serve": "lfm2vl.serve.cli", "bench": "lfm2vl.bench", "finetune": "lfm2vl.finetune.cli",
             "merge": "lfm2vl.finetune.merge", "eval": "lfm2vl.eval.cli"}
DEFAULT_PROMPT = "Describe this image."


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; options whose default is None, off or empty state theirs in the
    help text itself (where the value comes from), so nothing says "(default: None)"."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d == [] or action.help is None:
            return action.help
        return super()._get_help_string(action)


def version() -> str:
    """The installed distribution's version, else the package's own."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("lfm2vl")
    except PackageNotFoundError:
        from . import __version__

        return __version__


# ---- option values: checked while parsing, worded with the flag the user typed -----------------------------------
def _number(parse, check):
    """An argparse type: parse the text (argparse reports unparsable text), then check(value) -> problem or None."""
    def convert(text: str):
        value = parse(text)
        problem = check(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{text} is invalid; {problem}")
        return value

    convert.__name__ = parse.__name__  # argparse says "invalid int value: 'x'"
    return convert


def sampling_type(name: str, parse):
    """The argparse type of a sampling option: SamplingParams' own rule (generate/sampling.py RULES)."""
    def check(value):
        from .generate.sampling import option_problem

        return option_problem(name, value)

    return _number(parse, check)


positive_int = _number(int, lambda v: None if v >= 1 else "expected an integer >= 1")


def schema_file(path: str) -> str:
    """--json-schema FILE: the schema's JSON text, checked (and compiled) while parsing."""
    from .generate.constraints import Constraint

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        Constraint.from_options(json_schema=text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{path}: {e}") from None
    return text


def tools_file(path: str) -> list:
    """--tools FILE: a JSON list of tools (OpenAI's function-tool shape), checked while parsing."""
    from .processor.tools import check_tools

    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{path} is not JSON: {e}") from None
    try:
        check_tools(tools)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{path}: {e}") from None
    return tools


def tool_choice_type(value: str):
    """--tool-choice: auto, none, required, or a function's name (that function is called)."""
    if value in ("auto", "none", "required"):
        return value
    if not value.isidentifier():
        raise argparse.ArgumentTypeError(f"{value!r} is invalid; expected auto, none, required or a function name")
    return {"type": "function", "function": {"name": value}}


def regex_type(value: str) -> str:
    """--regex: a pattern the grammar engine accepts, checked while parsing."""
    from .generate.constraints import Constraint

    try:
        Constraint.from_options(regex=value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_weight_formats(g) -> None:
    """--int8 / --int4 (exclusive) and --int8-vision, the CPU weight formats of lfm2vl.load, on parser or group g."""
    q = g.add_mutually_exclusive_group()
    q.add_argument("--int8", action="store_true", help="int8 language-model linears (CPU; slightly different "
                   "results; prefill in int8 compute where that is faster)")
    q.add_argument("--int4", action="store_true", help="int4 language-model linears, groups of 32 (CPU; smallest "
                   "and fastest decode, results differ more than int8)")
    g.add_argument("--int8-vision", action="store_true", help="the vision tower's linears in int8 with int8 compute "
                   "(CPU; faster images, slightly different image features)")


def add_common(p: argparse.ArgumentParser) -> None:
    from .generate.sampling import SamplingParams as S
    from .resolve import ORDER_HELP

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=ORDER_HELP)
    g.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16",
                   help="weights and activations")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (the N-th GPU) or mps")
    g.add_argument("--adapter", metavar="DIR", default=None,
                   help="LoRA adapter folder (PEFT's format, e.g. from `lfm2vl finetune`), merged into the weights "
                        "at load (default: none)")
    add_weight_formats(g)
    g.add_argument("--no-optimize", action="store_true", help="keep plain torch modules (no CPU fast paths)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start)")
    g.add_argument("--low-memory", action="store_true",
                   help="keep the vision tower's and the language model's weights out of memory together (lower "
                        "peak RSS, slower image requests)")
    g = p.add_argument_group("images (defaults from the checkpoint's processor files)")
    g.add_argument("--min-image-tokens", metavar="N", type=positive_int, default=None,
                   help="fewest image tokens per image or tile (default: the checkpoint's)")
    g.add_argument("--max-image-tokens", metavar="N", type=positive_int, default=None,
                   help="most image tokens per image or tile (default: the checkpoint's)")
    g.add_argument("--no-image-splitting", action="store_true",
                   help="never cut large images into tiles (default: the checkpoint's setting)")
    g = p.add_argument_group("sampling (defaults from the model card)")
    g.add_argument("--max-new-tokens", metavar="N", type=positive_int, default=512, help="most tokens to generate")
    for name, parse, metavar, what in (("temperature", float, "T", "0 = greedy"), ("top_k", int, "K", "0 = off"),
                                       ("top_p", float, "P", "1 = off"), ("min_p", float, "P", "0 = off"),
                                       ("repetition_penalty", float, "X", "1 = off"),
                                       ("presence_penalty", float, "X", "-2 to 2, 0 = off"),
                                       ("frequency_penalty", float, "X", "-2 to 2, 0 = off")):
        g.add_argument("--" + name.replace("_", "-"), metavar=metavar, type=sampling_type(name, parse), default=None,
                       help=f"{what} (default: {getattr(S, name)})")
    g.add_argument("--seed", metavar="N", type=sampling_type("seed", int), default=None,
                   help="sampling seed, -2**63 to 2**64-1 (default: a random one)")
    g.add_argument("--stop", metavar="TEXT", action="append", default=None,
                   help="stop string, repeatable (default: none)")
    g = p.add_argument_group("structured output (at most one)")
    g = g.add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", dest="json_schema", type=schema_file, default=None,
                   help="the answer is JSON valid under the JSON schema in FILE (default: free text)")
    g.add_argument("--regex", metavar="PATTERN", type=regex_type, default=None,
                   help="the answer matches the regular expression (default: none)")
    g.add_argument("--choice", metavar="TEXT", dest="choices", action="append", default=None,
                   help="the answer is one of these strings, repeatable (default: none)")
    g = p.add_argument_group("tools (LFM2's tool-call format)")
    g.add_argument("--tools", metavar="FILE", type=tools_file, default=None,
                   help="a JSON list of function tools the model may call (default: none)")
    g.add_argument("--tool-choice", metavar="CHOICE", dest="tool_choice", type=tool_choice_type, default=None,
                   help="auto, none, required, or a function name to call (default: auto when --tools is given)")
    g.add_argument("--no-parallel-tool-calls", dest="parallel_tool_calls", action="store_const", const=False,
                   default=None, help="at most one call per reply (default: several may follow each other)")


def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    p = argparse.ArgumentParser(prog="lfm2vl", description="Run Liquid AI's LFM2-VL vision-language models.",
                                formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"lfm2vl {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("describe", help="answer a prompt about one or more images (streamed)", formatter_class=fmt)
    d.add_argument("images", nargs="+", metavar="IMAGE", help="image path or URL")
    d.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question about the images")
    add_common(d)
    c = sub.add_parser("chat", help="interactive conversation (/image PATH, /reset, /quit)", formatter_class=fmt)
    c.add_argument("--image", action="append", default=[],
                   help="attach an image to the first message, repeatable (default: none)")
    c.add_argument("--system", default=None, help="system prompt (default: none)")
    add_common(c)
    g = sub.add_parser("generate", help="generate for the conversation(s) in a JSON file", formatter_class=fmt)
    g.add_argument("--messages", required=True, metavar="FILE.json",
                   help="a list of messages, or a list of such lists (a batch); '-' reads stdin")
    g.add_argument("--json", action="store_true", help="print the result(s) as JSON (default: the text only)")
    g.add_argument("--continue-final-message", action="store_true",
                   help="continue the final assistant message instead of starting a new reply (default: a new "
                        "assistant turn)")
    add_common(g)
    sub.add_parser("serve", help="OpenAI-compatible HTTP server (lfm2vl serve --help)", add_help=False)
    sub.add_parser("bench", help="speed benchmark (lfm2vl bench --help)", add_help=False)
    sub.add_parser("finetune", help="fine-tune on image conversations: LoRA or full (lfm2vl finetune --help)",
                   add_help=False)
    sub.add_parser("merge", help="merge a LoRA adapter into a checkpoint (lfm2vl merge --help)", add_help=False)
    sub.add_parser("eval", help="benchmark scores: predictions for a VLMEvalKit TSV, local or via a server "
                   "(lfm2vl eval --help)", add_help=False)
    return p


def options(args) -> dict:
    """Engine options from the parsed arguments (unset ones keep the engine's defaults): every flag named after an
    engine option, except the prompt options, which the command that has them passes itself."""
    from .generate.options import ENGINE_OPTIONS, PROMPT_OPTIONS

    opts = {name: getattr(args, name, None) for name in ENGINE_OPTIONS if name not in PROMPT_OPTIONS}
    if args.no_image_splitting:
        opts["do_image_splitting"] = False
    return {k: v for k, v in opts.items() if v is not None}


# The engine options whose errors the CLI words as flags (tests check that they are engine options).
FLAG_WORDED = ("max_new_tokens", "min_image_tokens", "max_image_tokens", "do_image_splitting", "temperature",
               "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
               "continue_final_message")


def flag_wording(message: str) -> str:
    """An engine error names options as keywords (max_image_tokens=10); the user typed --max-image-tokens 10."""
    return re.sub(r"\b(%s)=" % "|".join(FLAG_WORDED), lambda m: "--" + m.group(1).replace("_", "-") + " ", message)


# ---- checks before the model loads -------------------------------------------------------------------------------
def is_remote(image: str) -> bool:
    return "://" in image or image.startswith("data:")


def image_problem(image: str) -> str | None:
    """Why a local image argument cannot be read (None if it is a file, or a URL, which is not checked here)."""
    if is_remote(image):
        return None
    p = Path(image)
    if p.is_dir():
        return f"image {image!r} is a folder, not an image file"
    if not p.is_file():
        return f"image {image!r} does not exist"
    return None


def check_images(images: list[str]) -> None:
    for im in images:
        problem = image_problem(im)
        if problem is not None:
            raise CLIError(problem)


def check_device(args) -> None:
    from .loading import LoadError, check_device as check

    try:
        check(args.device)
    except LoadError as e:
        raise CLIError(str(e)) from None


def resolve(args, prog: str = "lfm2vl"):
    """args.model after the default rules (resolve.py), the fallback note printed as one line; a missing bundled
    model is a CLIError."""
    from .loading import LoadError
    from .resolve import resolve_model, stderr_announcer

    try:
        return resolve_model(args.model, announce=stderr_announcer(prog))
    except LoadError as e:
        raise CLIError(str(e)) from None


def load_engine(args, prog: str = "lfm2vl"):
    """Resolve the model, then load it with a progress bar over the weight bytes; user-fixable load errors become a
    CLIError."""
    from tqdm import tqdm

    from .engine import load
    from .finetune.adapter import AdapterError
    from .loading import LoadError
    from .resolve import model_label

    model = resolve(args, prog)
    shown = model_label(model)
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", file=sys.stderr,
                       leave=False)
        bar.update(done - bar.n)

    with adapter_warnings():  # printed once the progress bar is closed
        try:
            return load(model, dtype=args.dtype, device=args.device, int8=args.int8, int4=args.int4,
                        int8_vision=args.int8_vision,
                        optimize=not args.no_optimize, compile=args.compile, low_memory=args.low_memory,
                        adapter=args.adapter, progress=progress)
        except AdapterError as e:
            raise CLIError(str(e)) from None
        except (LoadError, OSError, ValueError) as e:
            if not Path(model).exists() and str(e).startswith("could not get hub model"):
                raise CLIError(f"model {shown!r} is not in the local Hugging Face cache and cannot be "
                               f"downloaded (offline?); fetch it where there is network access with `hf download "
                               f"{shown} --local-dir DIR` and run with --model DIR") from None
            raise CLIError(f"cannot load model {shown!r}: {str(e).splitlines()[0]}") from None
        finally:
            if bar is not None:
                bar.close()


@contextlib.contextmanager
def adapter_warnings(prog: str = "lfm2vl"):
    """Print an adapter's warnings (target names that match nothing ...) as one line each, not Python's
    file:line format."""
    from .finetune.adapter import AdapterWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AdapterWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, AdapterWarning):
                    print(f"{prog}: warning: {w.message}", file=sys.stderr)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def stream_to(out, stream) -> None:
    """Write the pieces as they come, then a newline, also when stopped early (Ctrl-C, an error), so that what
    follows starts on a fresh line; closing the iterator at once cancels the request."""
    it = iter(stream)
    try:
        for piece in it:
            out.write(piece)
            out.flush()
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
        out.write("\n")
        out.flush()


def cmd_describe(args) -> int:
    check_images(args.images)
    check_device(args)
    engine = load_engine(args)
    stream_to(sys.stdout, engine.stream(args.prompt, images=args.images, **options(args)))
    return 0


def cmd_generate(args) -> int:
    from .processor.messages import conversation, is_batch

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
    batch = is_batch(messages)
    cont = args.continue_final_message
    for k, conv in enumerate(messages if batch else [messages]):  # the messages' shape, before the model loads
        try:
            conversation(conv, continue_final_message=cont)
        except ValueError as e:
            raise CLIError(f"{args.messages}: {'conversation %d: ' % (k + 1) if batch else ''}{e}") from None
    check_device(args)
    engine = load_engine(args)
    opts = {**options(args), **({"continue_final_message": True} if cont else {})}
    if not args.json and not batch:
        stream_to(sys.stdout, engine.stream(messages, **opts))
        return 0
    results = engine.generate(messages, **opts)
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


CHAT_HELP = ("Commands: /image PATH (attach to your next message), /tool RESULT (answer the model's tool call), "
             "/reset, /quit. Ctrl-C stops an answer; Ctrl-C or Ctrl-D at the prompt ends the chat.")


def enable_line_editing() -> None:
    """Line editing and history for input() on a terminal, where the readline module exists (not everywhere)."""
    try:
        import readline  # noqa: F401  (importing it is what makes input() use it)
    except ImportError:
        pass


def report_tool_calls(result) -> None:
    """After a reply that called tools: each call on stderr, and how to answer it."""
    for call in (result.tool_calls or []) if result is not None else []:
        fn = call["function"]
        print(f"(tool call {call['id']}: {fn['name']} {fn['arguments']}; answer with /tool RESULT)", file=sys.stderr)


def cmd_chat(args) -> int:
    check_images(args.image)
    check_device(args)
    engine = load_engine(args)
    chat = engine.chat(system=args.system, **options(args))
    pending = list(args.image)
    interactive = sys.stdin.isatty()
    if interactive:
        enable_line_editing()
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:  # Ctrl-D (or the end of piped input)
            if interactive:
                print()  # the shell prompt starts on a fresh line
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            chat.reset()
            pending = []
            print("(conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            problem = image_problem(path) if path else "usage: /image PATH"
            if problem is not None:
                print(f"({problem})", file=sys.stderr)
            else:
                pending.append(path)
                print(f"(attached {path})", file=sys.stderr)
            continue
        if line.startswith("/tool"):
            calls = chat.last.tool_calls if chat.last is not None else None
            if not calls or not line[len("/tool"):].strip():
                print("(usage: /tool RESULT, after the model called a tool)", file=sys.stderr)
                continue
            try:
                reply = chat.send_tool_result(line[len("/tool"):].strip(), tool_call_id=calls[-1]["id"])
            except ValueError as e:
                print(f"(error: {flag_wording(str(e))})", file=sys.stderr)
                continue
            print(reply.text, flush=True)
            report_tool_calls(chat.last)
            continue
        if line.startswith("/"):
            print(f"(unknown command {line.split()[0]}; {CHAT_HELP})", file=sys.stderr)
            continue
        turns = len(chat.messages)
        try:
            stream_to(sys.stdout, chat.stream(line, images=pending or None))
            report_tool_calls(chat.last)
        except ValueError as e:  # e.g. an unreadable image: report it and keep the conversation going
            print(f"(error: {flag_wording(str(e))})", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C while answering: stop this answer, back to the prompt
            kept = len(chat.messages) > turns
            print("(stopped; the answer so far stays in the conversation)" if kept else "(stopped)",
                  file=sys.stderr)
        pending = []


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
        print(f"lfm2vl: error: {flag_wording(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
