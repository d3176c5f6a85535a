"""Chat: a multi-turn conversation that keeps its cache between turns.

Each turn renders the whole conversation with the checkpoint's chat template (so the prompt is exactly what a
fresh run would see) and hands it to the conversation's own one-row BatchGenerator. The generator finds the
longest prefix already in the cache (earlier turns, their images included) and prefills only the rest, so images
are encoded once per conversation. If the re-tokenized reply differs from the generated tokens, reuse falls back
to the end of the previous prompt (a conv-state snapshot), never to a wrong state.

A reply cut short (Ctrl-C's KeyboardInterrupt, a stream closed early) is kept as far as it was streamed, with its
user message, so the conversation holds what the user saw; a turn stopped before any reply text is dropped.
With tools (options tools= / tool_choice=), a reply that calls them keeps its tool_calls in the conversation, and
`send_tool_result` adds a tool's answer and generates the model's next reply.
"""
from __future__ import annotations

from ..processor.messages import check_text, image_list
from .batch import BatchGenerator
from .options import split_options
from .request import Result
from .stream import Stream


class Chat:
    def __init__(self, engine, system: str | None = None, **options):
        """options: defaults for every turn (sampling, stop, max_new_tokens, image knobs)."""
        split_options(options)  # reject unknown names now, not at the first turn
        self.engine, self.options = engine, options
        self.system = system
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.gen = BatchGenerator(engine, max_batch=1, prefill_chunk=engine.prefill_chunk)
        self.last: Result | None = None

    def reset(self, system: str | None = None) -> None:
        """Start over (the cache stays: a new conversation with the same start still reuses it)."""
        self.system = system if system is not None else self.system
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last = None

    def send(self, text: str, images=None, **options) -> Result:
        """Add a user turn and generate the reply (appended to the conversation). The turn holds the engine's lock
        (engine.py, Threads): a turn sent from another thread waits for this one and sees its reply."""
        with self.engine.lock:
            stream = self.stream(text, images, **options)
            for _ in stream:
                pass
        return stream.result

    def send_tool_result(self, content: str, tool_call_id: str | None = None, **options) -> Result:
        """Add a tool's result (a `tool` turn answering the last reply's call) and generate the next reply. The
        conversation must end with a reply that called a tool."""
        if not self.messages or not self.messages[-1].get("tool_calls"):
            raise ValueError("send_tool_result answers a tool call, but the conversation's last reply called no "
                             "tool (give the model tools= and let it call one first)")
        if not isinstance(content, str):
            raise ValueError(f"the tool result must be a string, got {type(content).__name__}")
        with self.engine.lock:
            stream = self._turn({"role": "tool", "content": content, **({"tool_call_id": tool_call_id}
                                                                          if tool_call_id else {})}, options)
            for _ in stream:
                pass
        return stream.result

    def stream(self, text: str, images=None, **options):
        """Like send, but an iterator of text pieces; the reply is appended when the iterator is exhausted, or as far
        as it got when the iterator stops early (nothing is appended if it stops before any text)."""
        return self._turn(self._user_message(text, images), options)

    def _turn(self, user: dict, options: dict) -> Stream:
        req = self.engine.prepare(self.messages + [user], **{**self.options, **options})

        def done(result: Result) -> None:
            reply = {"role": "assistant", "content": result.text}
            if result.tool_calls:
                reply["tool_calls"] = result.tool_calls
            self.messages += [user, reply]
            self.last = result

        def stopped(partial: str) -> None:
            if partial:
                self.messages += [user, {"role": "assistant", "content": partial}]

        return Stream(self.gen, req, on_done=done, on_stop=stopped)

    @staticmethod
    def _user_message(text: str, images) -> dict:
        """The user turn of `text` and `images`; text must be a string of valid Unicode."""
        if not isinstance(text, str):
            raise ValueError(f"the message text must be a string, got {type(text).__name__}")
        check_text(text, "the message text")
        imgs = image_list(images)
        if not imgs:
            return {"role": "user", "content": text}
        return {"role": "user", "content": [{"type": "image", "image": im} for im in imgs] +
                [{"type": "text", "text": text}]}
