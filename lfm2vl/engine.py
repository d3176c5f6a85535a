"""Engine: what `lfm2vl.load` returns. Model + config + processor + tokenizer, and the generation API.

    engine = lfm2vl.load()          # the default model (resolve.py: $LFM2VL_MODEL, LiquidAI/LFM2-VL-450M or bundled)
    engine = lfm2vl.load("LiquidAI/LFM2-VL-450M")                 # or a folder, or "bundled"
    res = engine.generate([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                                        {"type": "text", "text": "What is this?"}]}])
    res.text, res.token_ids, res.finish_reason, res.prompt_tokens, res.completion_tokens, res.decode_tps
    for piece in engine.stream("Describe it.", images=["cat.jpg"]): print(piece, end="")
    chat = engine.chat(); chat.send("Hi"); chat.send("And this?", images=["dog.png"])

Every call goes through the one loop in generate/batch.py (BatchGenerator). Single requests share a warm one-row
generator, so a prompt that extends an earlier one (same images) reuses its cache. A list of conversations runs
as one continuous batch; each row's output equals running it alone.
Messages follow the OpenAI / transformers format: content is a string or a list of parts {"type": "text"},
{"type": "image", "image" | "url" | "path": ...} or {"type": "image_url", "image_url": {"url": ...}}; roles are
system, developer (= system), user, assistant and tool (processor/chat.py ROLES); `tools=` / `tool_choice=` use
LFM2's tool-call format (processor/tools.py, generate/toolcall.py). processor/messages.py normalises them.
A conversation that ends in an assistant message is a closed turn: the prompt opens a new assistant turn after it,
unless continue_final_message=True, which leaves that message open for the model to continue.

Threads: one engine may be called from several threads. Its generators step one at a time under `engine.lock` (an
RLock): a generate call or a chat turn holds it until its reply is complete, so concurrent calls wait their turn,
and each output equals the one it gets alone. A stream holds the lock only while it computes its next piece, never
between pieces: a call from another thread runs between two pieces (the stream's later pieces are kept for it), and
a stream that is abandoned, closed or garbage-collected holds nothing. One model computes one step at a time, so
threads add no throughput: to serve many clients, run `lfm2vl serve`, which batches their requests.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

import numpy as np
import torch

from .generate.batch import BatchGenerator
from .generate.options import (MAX_BATCH, PREFILL_CHUNK, PROMPT_OPTIONS, REQUEST_OPTIONS,  # noqa: F401
                               SAMPLING_OPTIONS, split_options)
from .generate.request import Request, Result
from .generate.sampling import SamplingParams
from .generate.steps import compiled_decode
from .generate.stream import Stream
# The message handling lives in processor/messages.py; its names stay importable from here.
from .processor.config import check_image_budget
from .processor.messages import (IMAGE_KEYS, checked_conversation, conversation, is_batch, text_chars,  # noqa: F401
                                 to_messages)


def load(model: str | os.PathLike | None = None, *, dtype=None, device=None, optimize: bool = True,
         int8: bool = False, int4: bool = False, int8_vision: bool = False, bf16_packed: bool | None = None,
         compile: bool = False, low_memory: bool = False, adapter: str | os.PathLike | None = None,
         progress: Callable[[int, int], None] | None = None) -> "Engine":
    """Load a checkpoint folder or hub id -> Engine. dtype defaults to bfloat16, device to cpu.

    model: a folder, a hub id or "bundled" (the demo model shipped in the package); None applies the default rules
    of resolve.py ($LFM2VL_MODEL, else LiquidAI/LFM2-VL-450M when cached or the hub is reachable, else the bundled
    model with a BundledModelWarning).

    optimize: on CPU, swap in the fast modules of cpu/speed.py (same parameters and results within float
    rounding); int8 / int4: weight-only int8 / int4 linears in the language model and the output head (opt-in,
    changes results slightly; int4 in groups of 32 weights, the smallest and fastest decode); int8_vision: the
    vision tower's encoder linears in int8 with int8 compute (opt-in, faster images, changes image features slightly);
    bf16_packed: the bf16 language model's linears and output head packed losslessly in 12 bits a weight (the same
    results as bf16, a faster decode where memory sets its pace, a slightly slower first token); None (the default)
    packs where it is fast and nothing else is asked for (cpu/packed.py `packs_by_default`), False never. Packed
    and int8 / int4 weights of a checkpoint folder are kept on disk and mapped at later loads (cpu/wcache.py; not
    with an adapter; $LFM2VL_WEIGHT_CACHE=off keeps them in memory only); compile:
    torch.compile the static-shape decode step (opt-in, for a GPU; on the CPU only with optimize=False, since the
    fast modules' native kernels run outside the compiled graphs); low_memory: the vision tower's and the language
    model's memory-mapped weights never stay resident together (cpu/lowmem.py; lower peak RSS, slower image requests);
    adapter: a LoRA adapter folder (PEFT's format, from `lfm2vl finetune` or PEFT), merged into the weights
    before the CPU speed-ups, so generation runs as fast as with the base model."""
    from .loading import check_device, load_model, parse_device, parse_dtype, resolve_folder
    from .processor import Processor

    flags = {"optimize": optimize, "int8": int8, "int4": int4, "int8_vision": int8_vision, "compile": compile,
             "low_memory": low_memory, "bf16_packed": bf16_packed}
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)) and not (name == "bf16_packed" and value is None):
            raise ValueError(f"{name}={value!r} is invalid; expected True or False"
                             f"{' (or None: the default for this CPU)' if name == 'bf16_packed' else ''}")
    formats = [name for name, on in (("int8", int8), ("int4", int4), ("bf16_packed", bf16_packed)) if on]
    if len(formats) > 1:
        raise ValueError(f"{'=True and '.join(formats)}=True are exclusive: pick one weight format")
    if bf16_packed and parse_dtype(dtype) != torch.bfloat16:
        raise ValueError(f"bf16_packed packs bfloat16 weights; got dtype={dtype!r} (leave dtype unset or pass "
                         "torch.bfloat16)")
    cpu_only = formats + [name for name, on in (("int8_vision", int8_vision), ("low_memory", low_memory)) if on]
    if cpu_only and parse_device(device).type != "cpu":
        raise ValueError(f"{' and '.join(cpu_only)} work{'s' if len(cpu_only) == 1 else ''} on CPU only (native "
                         f"kernels, memory-mapped weights); "
                         f"got device={str(device)!r}: drop {'them' if len(cpu_only) > 1 else 'it'} or use "
                         f"device='cpu'")
    fast_cpu = [name for name, on in (("optimize", optimize), ("int8", int8), ("int4", int4),
                                      ("int8_vision", int8_vision)) if on]
    if compile and fast_cpu and parse_device(device).type == "cpu":
        raise ValueError(f"compile=True does not combine with {'=True, '.join(fast_cpu)}=True on the CPU: the fast "
                         "modules' native kernels run outside torch.compile's graphs, so a compiled decode step "
                         "recompiles and is no faster; leave compile off on the CPU, or pass optimize=False to "
                         "compile the plain torch modules")
    check_device(device)  # an unknown name or a missing GPU: said before anything is read
    if bf16_packed is None:
        bf16_packed = default_bf16_packed(dtype, device, optimize=optimize, int8=int8, int4=int4,
                                          low_memory=low_memory, compile=compile)
    from .resolve import resolve_model

    model = resolve_model(model)
    kw = {"progress": progress} if progress is not None else {}
    if adapter is not None:
        from .finetune.adapter import read_adapter

        adapter_files = read_adapter(adapter)  # a bad adapter folder is said before the model is read
    folder = resolve_folder(model)
    processor = Processor.from_pretrained(folder)  # a broken tokenizer or template is said before the weights are read
    m, config, folder = load_model(folder, dtype=dtype, device=device, **kw)
    if adapter is not None:
        from .finetune.adapter import apply_adapter

        apply_adapter(m, *adapter_files, where=f"adapter {adapter}")
    if optimize or formats or int8_vision:
        from .cpu.speed import optimize_for_cpu
        optimize_for_cpu(m, int8=int8, int4=int4, int8_vision=int8_vision, bf16_packed=bf16_packed,
                         source=folder if adapter is None else None)  # merged weights are not the checkpoint's
    if low_memory:
        from .cpu.lowmem import set_low_memory

        set_low_memory(m)
    return Engine(m, config, processor, compile=compile)


def default_bf16_packed(dtype=None, device=None, *, optimize: bool = True, int8: bool = False, int4: bool = False,
                        low_memory: bool = False, compile: bool = False) -> bool:
    """What `load(bf16_packed=None)` does with these options: pack a bf16 CPU model where the packed kernels run fast
    (cpu/packed.py `packs_by_default`), unless another weight format, low_memory, compile or optimize=False is
    asked for."""
    from .cpu.packed import packs_by_default
    from .loading import parse_device, parse_dtype

    return (optimize and not (int8 or int4 or low_memory or compile) and parse_dtype(dtype) == torch.bfloat16
            and parse_device(device).type == "cpu" and packs_by_default())


class Engine:
    def __init__(self, model, config, processor, *, prefill_chunk: int = PREFILL_CHUNK, compile: bool = False):
        self.model, self.config, self.processor = model, config, processor
        # The decode step (T == 1) has static shapes per (rows, cache capacity): compile it, not the prefill.
        self.decode_forward = compiled_decode(model) if compile else None
        self.tokenizer = processor.tokenizer
        eos = list(getattr(self.tokenizer, "eos_token_ids", None) or [])
        if not eos:  # fall back to the model config's eos (an int or a list)
            e = config.text_config.eos_token_id
            eos = [] if e is None else ([e] if isinstance(e, int) else list(e))
        self.eos_ids = tuple(int(i) for i in eos)
        self.prefill_chunk = prefill_chunk
        self.lock = threading.RLock()  # every generator of this engine steps under it (see Threads above)
        self._single: BatchGenerator | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Activation (and cache) dtype: the token embedding's."""
        return self.model.model.language_model.embed_tokens.weight.dtype

    def reset(self) -> None:
        """Forget the warm cache kept between single calls."""
        with self.lock:
            self._single = None

    def release_memory(self) -> None:
        """Hand the heap's freed pages back to the OS (glibc keeps tens of MB after a vision pass): for a server
        going idle."""
        from .cpu.memory import trim_heap

        trim_heap()

    # ---- preparing requests -----------------------------------------------------------------------------------
    def prepare(self, messages, images=None, *, context: int | None = None, **options) -> Request:
        """A conversation (or a prompt string plus images) and options -> Request. Raises ValueError on bad input.

        The prompt ends with a new assistant turn (the generation prompt), also after a conversation that ends in
        an assistant message. continue_final_message=True instead leaves the final assistant message open (no
        end-of-turn token after its text, no generation prompt) so that the reply continues it. Special-token
        strings in the messages are tokenized as plain text unless parse_special=True.
        context: the most tokens the prompt may take (default: the model's context). A text too long for it is
        refused from its length in characters, before it is rendered or tokenized. min_image_tokens /
        max_image_tokens lie within the checkpoint's budget (processor/config.py check_image_budget)."""
        sampling, request, knobs, prompt = split_options(options)
        check_image_budget(knobs, self.processor.settings.image.max_image_tokens)
        cont = prompt.get("continue_final_message", False)
        escape = not prompt.get("parse_special", False)
        msgs, imgs, places = checked_conversation(messages, images, continue_final_message=cont)
        limit = self.config.text_config.max_position_embeddings if context is None else context
        what = "the model's context" if context is None else "the context"
        chars, per_token = text_chars(msgs), self.tokenizer.max_token_chars
        if chars > 2 * limit * per_token:  # 2x slack for normalizers that merge characters
            raise ValueError(f"the messages have {chars} characters of text, far more than {what} of {limit} tokens "
                             "holds")
        text = self.processor.apply_chat_template(msgs, add_generation_prompt=not cont, continue_final_message=cont,
                                                  escape_special=escape, tools=prompt.get("tools"),
                                                  tool_format=True)
        batch = self.processor(text=text, images=load_images(imgs, places) or None, escaped=escape, pad_patches=False,
                               **knobs)
        ids = batch["input_ids"][0].tolist()
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens but {what} holds {limit} tokens")
        pixels = batch.get("pixel_values")
        if pixels is not None:
            pixels = pixels.to(self.model.pixel_dtype)  # the tower's dtype: the same features, half of float32's bytes
        return Request(ids, pixels, batch.get("pixel_attention_mask"), batch.get("spatial_shapes"),
                       params=SamplingParams(**sampling), eos_ids=self.eos_ids, **request)

    # ---- generation -------------------------------------------------------------------------------------------
    def generate(self, messages, images=None, **options) -> Result | list[Result]:
        """One conversation -> Result; a list of conversations (or of prompt strings) -> list of Results, run as
        one continuous batch (`max_batch` rows at a time, default 16). The reply is a new assistant turn, also
        after a final assistant message, unless continue_final_message=True (see prepare). A constraint that
        reaches a dead end (no token can finish the answer) raises ValueError for one conversation; in a batch, that
        conversation's Result has finish_reason "error" and says why in `error`, and the others keep theirs."""
        if is_batch(messages):
            if images is not None:
                raise ValueError("for a batch, put the images inside each conversation's messages")
            max_batch = options.pop("max_batch", MAX_BATCH)
            reqs = []
            for k, m in enumerate(messages):
                try:
                    reqs.append(self.prepare(m, **options))
                except ValueError as e:
                    raise ValueError(f"conversation {k + 1} of {len(messages)}: {e}") from None
            gen = BatchGenerator(self, max_batch=min(max_batch, len(reqs)), prefill_chunk=self.prefill_chunk)
            rids = [gen.add(r) for r in reqs]
            out = gen.run(rids)
            return [out[r] for r in rids]
        return self._run_single(self.prepare(messages, images, **options), None)

    def stream(self, messages, images=None, **options) -> "Stream":
        """An iterator of text pieces (never splitting a character); `.result` holds the Result afterwards. Options
        and the prompt as in generate."""
        return Stream(self._single_gen(), self.prepare(messages, images, **options))

    def chat(self, system: str | None = None, **options):
        """A conversation that keeps its cache between turns (see generate/chat.py)."""
        from .generate.chat import Chat

        return Chat(self, system, **options)

    def _single_gen(self) -> BatchGenerator:
        with self.lock:
            if self._single is None:
                self._single = BatchGenerator(self, max_batch=1, prefill_chunk=self.prefill_chunk)
            return self._single

    def _run_single(self, req: Request, gen: BatchGenerator | None) -> Result:
        with self.lock:  # add and run as one: no other thread's run takes the request's events
            gen = gen or self._single_gen()
            rid = gen.add(req)
            return gen.run([rid])[rid].checked()


def load_images(images: list, places: list) -> list:
    """Decode every image up front, so that an error names the bad one by its place (normalize's places:
    "image 2 of 3 (messages[0].content[1]): ...", "messages[0].content[0]: ..."; None: load_image's message, which
    names a file or URL itself)."""
    from .processor.io import load_image

    out = []
    for im, place in zip(images, places):
        try:
            out.append(load_image(im))
        except ValueError as e:
            if place is None:
                raise
            raise ValueError(f"{place}: {e}") from None
    return out
