"""The `lfm2vl` command (also `python -m lfm2vl`): the parser and the dispatch here, option types and checks in
args.py, the describe / generate / chat commands in commands.py.

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
missing image, bad JSON) print one line and exit with status 1 (2 for option errors), without a traceback; any
other exception (a defect of lfm2vl) prints one line too and leaves its traceback in a file it names.
In `chat`, Ctrl-C stops the answer being written and returns to the prompt; Ctrl-C or Ctrl-D at the prompt ends.
"""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
import traceback

from .args import CLIError, HelpFormatter, add_common, flag_wording, version
from .commands import cmd_chat, cmd_describe, cmd_generate

DELEGATED = {"serve": "lfm2vl.serve.cli", "bench": "lfm2vl.bench", "finetune": "lfm2vl.finetune.cli",
             "merge": "lfm2vl.finetune.merge", "eval": "lfm2vl.eval.cli"}
DEFAULT_PROMPT = "Describe this image."


def build_parser():
    fmt = HelpFormatter
    import argparse

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



COMMANDS = {"describe": cmd_describe, "chat": cmd_chat, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # a defect, not the user's input: one line here, the traceback in a file for the report
        print(f"lfm2vl: internal error: {type(e).__name__}: {e} ({crash_report()})", file=sys.stderr)
        return 1


def dispatch(argv: list[str]) -> int:
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


def crash_report() -> str:
    """Writes the traceback being handled to a file in the temporary folder; says where (or that it could not)."""
    try:
        fd, path = tempfile.mkstemp(prefix="lfm2vl-crash-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(f"lfm2vl {version()}, python {sys.version.split()[0]}, argv {sys.argv!r}\n")
            traceback.print_exc(file=f)
    except OSError as e:
        return f"no traceback kept: {e.strerror or e}"
    return f"a defect of lfm2vl; the traceback is in {path}"


if __name__ == "__main__":
    sys.exit(main())
