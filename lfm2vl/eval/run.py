"""Running a model over a benchmark file: greedy predictions for every row, saved as they come, then the scores.

    rows = select_rows(read_rows(path), limit=..., shard=(i, n))
    preds = Predictions(output, rows)          # resumes: rows already in `output` are kept and skipped
    run_rows(LocalPredictor(engine, bench, ...) or ServerPredictor(client, bench, ...), preds.todo(), preds.add)
    preds.save()

Decoding is greedy with no repetition penalty (VLMEvalKit's setting). A row that cannot be answered (an image that
does not decode, an error from the engine or the server for that row) gets a prediction starting with FAILED and is
counted; it never ends the run, and a resumed run tries it again. The predictions file is rewritten atomically
from time to time (at most ~5% of the run spent writing) and at the end, so an interrupted run resumes from it.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from .prompts import build_messages
from .tsv import FAILED_PREFIX as FAILED, read_predictions, write_predictions
# Greedy decoding, no penalties: VLMEvalKit's setting for LFM2-VL.
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
PREPARED_AHEAD = 2  # rows prepared (images decoded, prompts tokenized) per batch row, ahead of the decoder


class RunError(Exception):
    """A problem that ends the run (the server went away, a predictions file from another data set)."""


def is_failed(prediction: str) -> bool:
    return str(prediction).startswith(FAILED)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    i, sep, n = text.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text} is invalid; expected i/n with 0 <= i < n (e.g. 0/4 for the first of four)")
    return i, n


def select_rows(rows: list, limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> list:
    """The first `limit` rows, then shard i of n: a contiguous slice, so shards joined in order give the rows."""
    if limit is not None:
        rows = rows[:limit]
    i, n = shard
    return rows[len(rows) * i // n:len(rows) * (i + 1) // n]


class Predictions:
    """The predictions of one run, in the rows' order, saved to `path` (the rows done so far, input columns plus
    `prediction`). An existing file at `path` is resumed: its rows' predictions are kept, except failed ones."""

    def __init__(self, path: str | os.PathLike, rows: list, min_interval_s: float = 10.0):
        self.path, self.rows = Path(path), rows
        seen = set()
        for r in rows:
            if r.index in seen:
                raise RunError(f"index {r.index} appears twice in the data; each row needs its own index")
            seen.add(r.index)
        self.by_index: dict[str, str] = {}
        if self.path.exists():
            old_rows, old_preds = read_predictions(self.path)
            extra = [r.index for r in old_rows if r.index not in seen]
            if extra:
                raise RunError(f"{self.path} holds predictions for rows this run does not have (index {extra[0]}"
                               f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}); pass another --output "
                               "or remove the file")
            self.by_index = {r.index: p for r, p in zip(old_rows, old_preds) if not is_failed(p)}
        self.resumed = len(self.by_index)
        self.failed = 0
        self.min_interval_s, self._last_save, self._save_s, self._dirty = min_interval_s, time.monotonic(), 0.0, False

    def todo(self) -> list:
        return [r for r in self.rows if r.index not in self.by_index]

    def add(self, row, prediction: str) -> None:
        self.by_index[row.index] = prediction
        self.failed += is_failed(prediction)
        self._dirty = True
        # Rewriting the whole file costs time (the images are in it): at most every 20x the last write's duration.
        if time.monotonic() - self._last_save >= max(self.min_interval_s, 20 * self._save_s):
            try:
                self.save()
            except OSError:  # the predictions stay in memory; the next save tries again, the last one raises
                self._last_save = time.monotonic()

    def save(self) -> None:
        t0 = time.monotonic()
        done = [r for r in self.rows if r.index in self.by_index]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_predictions(self.path, done, [self.by_index[r.index] for r in done])
        self._last_save = time.monotonic()
        self._save_s, self._dirty = self._last_save - t0, False

    def complete(self) -> bool:
        return len(self.by_index) == len(self.rows)

    def predictions(self) -> list[str]:
        return [self.by_index[r.index] for r in self.rows]


def failure(error: BaseException | str) -> str:
    text = str(error).strip().splitlines()
    return FAILED + (text[0] if text else type(error).__name__)


# ---- local model -------------------------------------------------------------------------------------------------
class LocalPredictor:
    """Greedy predictions from an Engine, in one continuous batch: up to `batch_size` rows decode together and a
    finished row's place is taken by the next one at once."""

    def __init__(self, engine, benchmark, *, max_new_tokens: int = 1024, batch_size: int = 16):
        self.engine, self.benchmark = engine, benchmark
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _prepare(self, row):
        req = self.engine.prepare(build_messages(self.benchmark, row), max_new_tokens=None, **GREEDY)
        context = self.engine.config.text_config.max_position_embeddings
        req.max_new_tokens = min(self.max_new_tokens, context - len(req.input_ids))  # prepare leaves room for 1
        return req

    def _alone(self, req) -> str:
        from ..generate.batch import BatchGenerator

        gen = BatchGenerator(self.engine, max_batch=1, prefill_chunk=self.engine.prefill_chunk)
        rid = gen.add(req)
        return gen.run([rid])[rid].text

    def run(self, rows: list, on_done: Callable[[object, str], None]) -> None:
        from ..generate.batch import BatchGenerator

        if not rows:
            return
        gen = BatchGenerator(self.engine, max_batch=min(self.batch_size, len(rows)),
                             prefill_chunk=self.engine.prefill_chunk)
        queue, waiting = iter(rows), {}  # rid -> (row, request)
        ahead = PREPARED_AHEAD * gen.max_batch
        while True:
            while len(waiting) < ahead:  # prepare the next rows (a bad one is answered as failed at once)
                row = next(queue, None)
                if row is None:
                    break
                try:
                    req = self._prepare(row)
                    waiting[gen.add(req)] = (row, req)
                except Exception as e:  # noqa: BLE001 - any error of one row fails that row only
                    on_done(row, failure(e))
            if not waiting:
                return
            try:
                events = gen.step()
            except Exception:  # noqa: BLE001 - the step's rows are dropped: run each alone to find the bad one
                for rid in [rid for rid in waiting if rid not in gen.actives]:
                    row, req = waiting.pop(rid)
                    try:
                        on_done(row, self._alone(req))
                    except Exception as e:  # noqa: BLE001
                        on_done(row, failure(e))
                continue
            for ev in events:
                if ev.result is not None:
                    on_done(waiting.pop(ev.rid)[0], ev.result.text)


# ---- any OpenAI-compatible server --------------------------------------------------------------------------------
def image_data_url(image) -> str:
    """An image of a message part (base64 text, a path, a data: or http(s) URL, bytes or a PIL image) -> a URL the
    server reads; encoded data is checked to decode, so a bad image fails its row here as it does locally."""
    import base64
    import binascii
    import io

    from PIL import Image

    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        s = os.fspath(image)
        if s.startswith(("http://", "https://")):
            return s
        if s.startswith("data:"):
            s = s.split(",", 1)[1] if "," in s else ""
        if len(s) < 4096 and os.path.isfile(s):
            data = Path(s).read_bytes()
        else:
            try:
                data = base64.b64decode("".join(s.split()), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("image is neither a file nor base64 data") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mime = Image.MIME.get(im.format or "", "image/png")
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bad data
        raise ValueError(f"image does not decode: {e}") from None
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def openai_messages(messages: list[dict]) -> list[dict]:
    """Our messages -> OpenAI's: image parts become image_url parts with data: URLs."""
    from ..processor.messages import IMAGE_KEYS

    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    src = next(p[k] for k in IMAGE_KEYS if p.get(k) is not None)
                    parts.append({"type": "image_url", "image_url": {"url": image_data_url(src)}})
                else:
                    parts.append(p)
            content = parts
        out.append({**m, "content": content})
    return out


class ServerPredictor:
    """Greedy predictions from an OpenAI-compatible /v1/chat/completions endpoint (lfm2vl serve, vLLM, ...), with
    `batch_size` requests in flight so that a batching server decodes them together."""

    def __init__(self, url: str, benchmark, *, api_key: str | None = None, model: str | None = None,
                 max_new_tokens: int = 1024, batch_size: int = 16, timeout_s: float = 600.0):
        from .endpoint import Endpoint

        self.url, self.benchmark, self.max_new_tokens, self.batch_size = url, benchmark, max_new_tokens, batch_size
        self.endpoint = Endpoint(url, api_key=api_key, timeout_s=timeout_s, connections=batch_size, what="server",
                                 error=RunError)
        self.client = self.endpoint.client
        self.extras = {"repetition_penalty": 1.0}  # vLLM and lfm2vl serve take it; dropped if the server refuses
        self.model = model or self.endpoint.first_model("--served-model")

    def complete(self, messages: list[dict]) -> str:
        import httpx

        body = {"model": self.model, "messages": openai_messages(messages), "max_tokens": self.max_new_tokens,
                "temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
        for attempt in range(3):
            try:
                r = self.client.post("/v1/chat/completions", json={**body, **self.extras})
            except httpx.TimeoutException as e:
                raise ValueError(f"the server did not answer in time ({type(e).__name__})") from None
            except httpx.TransportError as e:
                raise self.endpoint.unreachable(e) from None
            if r.status_code == 400 and self.extras and "repetition_penalty" in r.text:
                self.extras = {}  # a server without the extra: plain OpenAI parameters
                continue
            if r.status_code >= 500 and attempt < 2:
                continue
            break
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001
                message = r.text[:200]
            raise ValueError(f"HTTP {r.status_code} from the server: {message}")
        return r.json()["choices"][0]["message"].get("content") or ""

    def run(self, rows: list, on_done: Callable[[object, str], None]) -> None:
        def one(row) -> str:
            return self.complete(build_messages(self.benchmark, row))

        queue = iter(rows)
        with ThreadPoolExecutor(self.batch_size) as pool:
            pending = {}
            try:
                while True:
                    while len(pending) < PREPARED_AHEAD * self.batch_size:
                        row = next(queue, None)
                        if row is None:
                            break
                        pending[pool.submit(one, row)] = row
                    if not pending:
                        return
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        row = pending.pop(f)
                        try:
                            on_done(row, f.result())
                        except RunError:
                            raise
                        except Exception as e:  # noqa: BLE001 - any error of one row fails that row only
                            on_done(row, failure(e))
            finally:
                for f in pending:
                    f.cancel()

    def close(self) -> None:
        self.client.close()


# ---- the run -----------------------------------------------------------------------------------------------------
def run_rows(predictor, preds: Predictions, *, progress: bool = True, desc: str = "eval",
             report: Callable[[str], None] | None = None) -> None:
    """Predict every row not yet in `preds`, with a progress bar (rows, rate, ETA); failures are reported (the
    first few) and counted. The file is saved at the end, also when interrupted."""
    from tqdm import tqdm

    todo = preds.todo()
    bar = tqdm(total=len(preds.rows), initial=len(preds.rows) - len(todo), desc=desc, unit="row", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    shown = 0

    def on_done(row, prediction: str) -> None:
        nonlocal shown
        preds.add(row, prediction)
        if is_failed(prediction):
            bar.set_postfix(failed=preds.failed)
            if shown < 10:
                say = report or (lambda s: tqdm.write(s, file=sys.stderr))
                say(f"row index {row.index}: {prediction.removeprefix(FAILED)}")
            shown += 1
        bar.update(1)

    try:
        predictor.run(todo, on_done)
    finally:
        bar.close()
        if preds._dirty or not preds.path.exists():
            preds.save()
