"""A judge model for MM-IFEval's constraints that no rule checks: any OpenAI-compatible chat endpoint, asked per
constraint whether a response satisfies it.

    judge = Judge("http://127.0.0.1:8000", model=None, api_key=None)
    judge.verdicts([(question, constraint_text, response), ...])  # -> [True / False / None (malformed reply)]

One short fixed prompt per constraint (the question, the constraint, the response), temperature 0, a few tokens;
the reply's first word decides: "yes" -> satisfied, "no" -> not, anything else -> None (the scorer counts it as
unsatisfied and as a judge failure). The judge sees text only (VLMEvalKit's judge also sees the image for
"direct_gpt" constraints and compares with a response made without the constraint for "cmp_gpt" ones).
An endpoint that cannot be reached, refuses the request or names no model raises JudgeError (it ends scoring).
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

PROMPT = """You check whether a response follows one instruction. Judge only the instruction below, strictly: if the \
response does not fully follow it, the answer is no.

Question given to the assistant:
{question}

Instruction:
{constraint}

Response:
<<<
{response}
>>>

Does the response follow the instruction? Reply with one word: yes or no."""


class JudgeError(Exception):
    """The judge cannot be used (unreachable, an HTTP error, no model name)."""


def parse_verdict(text: str | None) -> bool | None:
    """A judge's reply -> True ("yes"), False ("no") or None (anything else). Markdown and punctuation around the
    first word are ignored, as is case."""
    words = re.sub(r"[^a-z]+", " ", str(text or "").lower()).split()
    if not words or words[0] not in ("yes", "no"):
        return None
    return words[0] == "yes"


class Judge:
    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 120.0, workers: int = 8):
        from .endpoint import Endpoint

        self.url, self.workers = url, workers
        self.endpoint = Endpoint(url, api_key=api_key, timeout_s=timeout_s, what="judge", error=JudgeError)
        self.client = self.endpoint.client
        self._model = model

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.endpoint.first_model("--judge-model")
        return self._model

    def ask(self, question: str, constraint: str, response: str) -> bool | None:
        import httpx

        body = {"model": self.model, "temperature": 0.0, "max_tokens": 8,
                "messages": [{"role": "user", "content": PROMPT.format(question=question, constraint=constraint,
                                                                       response=response)}]}
        for attempt in range(3):
            try:
                r = self.client.post("/v1/chat/completions", json=body)
            except httpx.TimeoutException:
                return None  # a judge too slow for one item: that verdict is missing
            except httpx.TransportError as e:
                raise self.endpoint.unreachable(e) from None
            if r.status_code < 500 or attempt == 2:
                break
        if r.status_code != 200:
            raise JudgeError(f"the judge at {self.url} answered HTTP {r.status_code}: {r.text[:200]}")
        try:
            return parse_verdict(r.json()["choices"][0]["message"]["content"])
        except Exception:  # noqa: BLE001 - a reply without the expected fields is a malformed verdict
            return None

    def verdicts(self, items: list[tuple[str, str, str]]) -> list[bool | None]:
        """Verdicts for (question, constraint, response) items, in order, `workers` requests in flight."""
        if not items:
            return []
        _ = self.model  # resolve the name once, before the threads start
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda it: self.ask(*it), items))

    def close(self) -> None:
        self.client.close()
