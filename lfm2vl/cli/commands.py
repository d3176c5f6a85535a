"""The describe, generate and chat commands: model resolution and loading with a progress bar, then streaming the
answers."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from ..files import jsontext
from .args import CLIError, check_device, check_images, flag_wording, image_problem, is_file, options

def resolve(args, prog: str = "lfm2vl"):
    """args.model after the default rules (resolve.py), the fallback note printed as one line; a missing bundled
    model is a CLIError."""
    from ..loading import LoadError
    from ..resolve import resolve_model, stderr_announcer

    try:
        return resolve_model(args.model, announce=stderr_announcer(prog))
    except LoadError as e:
        raise CLIError(str(e)) from None


def load_engine(args, prog: str = "lfm2vl"):
    """Resolve the model, then load it with a progress bar over the weight bytes; user-fixable load errors become a
    CLIError."""
    from tqdm import tqdm

    from ..engine import load
    from ..finetune.adapter import AdapterError
    from ..loading import LoadError
    from ..resolve import model_label

    model = resolve(args, prog)
    shown = model_label(model)
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", file=sys.stderr,
                       leave=False)
        bar.update(done - bar.n)

    with load_warnings():  # printed once the progress bar is closed
        try:
            return load(model, dtype=args.dtype, device=args.device, int8=args.int8, int4=args.int4,
                        bf16_packed=args.bf16_packed, int8_vision=args.int8_vision,
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
def load_warnings(prog: str = "lfm2vl"):
    """Print the warnings lfm2vl gives while loading (an adapter's target names that match nothing, a cache folder
    that cannot be written, ...) as one line each, not Python's file:line format; other libraries' warnings are
    given back to Python's own handling."""
    from .. import __file__ as package_init
    from ..finetune.adapter import AdapterWarning

    ours = os.path.dirname(package_init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AdapterWarning)
        try:
            yield
        finally:
            seen = list(caught)
    for w in seen:  # outside the recording context: a warning given back is not recorded again
        if issubclass(w.category, AdapterWarning) or os.path.abspath(w.filename).startswith(ours + os.sep):
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


def check_text_option(text: str | None, flag: str) -> None:
    """A text option is valid Unicode (bytes that are not UTF-8 arrive as lone surrogates): a CLIError naming it."""
    from ..processor.messages import check_text

    try:
        if text is not None:
            check_text(text, flag)
    except ValueError as e:
        raise CLIError(str(e)) from None


def cmd_describe(args) -> int:
    check_text_option(args.prompt, "--prompt")
    check_images(args.images)
    check_device(args)
    engine = load_engine(args)
    stream_to(sys.stdout, engine.stream(args.prompt, images=args.images, **options(args)))
    return 0


def cmd_generate(args) -> int:
    from ..processor.messages import checked_conversation, is_batch

    try:
        data = sys.stdin.buffer.read() if args.messages == "-" else Path(args.messages).read_bytes()
    except OSError as e:
        raise CLIError(f"cannot read {args.messages}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{args.messages} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    try:
        messages = jsontext.loads(text)
    except json.JSONDecodeError as e:
        raise CLIError(f"{args.messages} is not valid JSON ({e})") from None
    if isinstance(messages, dict) and "messages" in messages:  # an OpenAI request body
        messages = messages["messages"]
    batch = is_batch(messages)
    cont = args.continue_final_message
    for k, conv in enumerate(messages if batch else [messages]):  # the messages and images, before the model loads
        try:
            checked = checked_conversation(conv, continue_final_message=cont)
            check_image_strings(checked.images, checked.places)
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
            print(r.text)  # a failed conversation keeps its (empty) line, so lines match conversations
    failed = [(k, r.error or "the generation failed") for k, r in enumerate(results, 1) if r.finish_reason == "error"]
    for k, error in failed:  # the other rows' answers stand; each failure is one line on stderr and the status
        print(f"lfm2vl: error: {'conversation %d: ' % k if batch else ''}{flag_wording(error)}", file=sys.stderr)
    return 1 if failed else 0


def check_image_strings(images: list, places: list) -> None:
    """Image strings of a messages file that name no existing file and no http(s) URL (data: URIs, base64, a
    missing path) are decoded now, so that a bad one is reported with its place before the model loads; files and
    URLs are read once, by the engine."""
    from ..processor.io import load_image

    for image, place in zip(images, places):
        if isinstance(image, str) and not image.startswith(("http://", "https://")) and not is_file(image):
            try:
                load_image(image)
            except ValueError as e:
                raise ValueError(f"{place}: {e}" if place else str(e)) from None


def result_dict(r) -> dict:
    return {"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "cached_tokens": r.cached_tokens, "ttft_s": round(r.ttft_s, 6), "prefill_tps": round(r.prefill_tps, 3),
            "decode_tps": round(r.decode_tps, 3), **({"error": r.error} if r.error else {})}


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
    check_text_option(args.system, "--system")
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
            if pending:  # attached with /image, never sent: say so rather than drop them unseen
                print(f"({len(pending)} attached image{'s' if len(pending) > 1 else ''} not sent: no message "
                      "followed)", file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat
            print()
            return 0
        except UnicodeDecodeError:  # a line that is not UTF-8 (stdin decoded strictly): report it and carry on
            print("(error: the line is not UTF-8 text)", file=sys.stderr)
            continue
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
