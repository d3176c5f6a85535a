"""The command line's options: value types checked while parsing (worded with the flag the user typed), the option
groups shared by describe / chat / generate and the serve, eval, bench and finetune commands, and the checks that run
before a model loads."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

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
        from .. import __version__

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
        from ..generate.sampling import option_problem

        return option_problem(name, value)

    return _number(parse, check)


positive_int = _number(int, lambda v: None if v >= 1 else "expected an integer >= 1")


def schema_file(path: str) -> str:
    """--json-schema FILE: the schema's JSON text, checked (and compiled) while parsing."""
    from ..generate.constraints import Constraint

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
    from ..files import jsontext
    from ..processor.tools import check_tools

    try:
        tools = jsontext.loads(Path(path).read_text(encoding="utf-8"))
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
    from ..generate.constraints import Constraint

    try:
        Constraint.from_options(regex=value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_weight_formats(g) -> None:
    """--int8 / --int4 / --bf16-packed (exclusive), --no-bf16-packed and --int8-vision, the CPU weight formats of
    lfm2vl.load, on parser or group g."""
    q = g.add_mutually_exclusive_group()
    q.add_argument("--int8", action="store_true", help="int8 language-model linears (CPU; slightly different "
                   "results; prefill in int8 compute where that is faster)")
    q.add_argument("--int4", action="store_true", help="int4 language-model linears, groups of 32 (CPU; smallest "
                   "and fastest decode, results differ more than int8)")
    q.add_argument("--bf16-packed", action="store_const", const=True, default=None, help="bf16 language-model "
                   "linears packed losslessly in 12 bits a weight (the same results as bf16, faster decode, a first "
                   "token up to ~6%% later; the default on CPUs with AVX512-BF16 and VBMI2)")
    g.add_argument("--no-bf16-packed", dest="bf16_packed", action="store_const", const=False, help="plain bf16 "
                   "weights even where packing them is the default (a slightly sooner first token; up to ~7%% more "
                   "throughput for a server with 16 clients)")
    g.add_argument("--int8-vision", action="store_true", help="the vision tower's linears in int8 with int8 compute "
                   "(CPU; faster images, slightly different image features)")


def add_common(p: argparse.ArgumentParser) -> None:
    from ..generate.sampling import SamplingParams as S
    from ..resolve import ORDER_HELP

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
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (a GPU; on the CPU only with "
                   "--no-optimize, whose plain modules it compiles; slow start)")
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




def options(args) -> dict:
    """Engine options from the parsed arguments (unset ones keep the engine's defaults): every flag named after an
    engine option, except the prompt options, which the command that has them passes itself."""
    from ..generate.options import ENGINE_OPTIONS, PROMPT_OPTIONS

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
    """Why an image argument cannot be read (None if it is a file, or a URL, which is not fetched here); a data: URI
    is decoded here (in memory, cheap), so a bad one is reported before the model loads."""
    if not image.strip():
        return "the image path is empty"
    if image.startswith("data:"):
        from ..processor.io import load_image

        try:
            load_image(image)
        except ValueError as e:
            return str(e)
        return None
    if is_remote(image):
        return None
    shown = repr(image) if len(image) <= 80 else repr(image[:77] + "...")
    try:
        p = Path(image)
        if p.is_dir():
            return f"image {shown} is a folder, not an image file"
        if not p.is_file():
            return f"image {shown} does not exist"
    except OSError as e:  # e.g. a name longer than the file system takes
        return f"image {shown} cannot name a file ({e.strerror or e})"
    return None


def is_file(text: str) -> bool:
    """Whether text names an existing file; False, not an OSError, for text no file can have (too long, say)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def check_images(images: list[str]) -> None:
    for im in images:
        problem = image_problem(im)
        if problem is not None:
            raise CLIError(problem)


def check_device(args) -> None:
    from ..loading import LoadError, check_device as check

    try:
        check(args.device)
    except LoadError as e:
        raise CLIError(str(e)) from None
