"""A thin wrapper over `tokenizers.Tokenizer` with the checkpoint's special tokens and chat template.

Special tokens and their ids come from the tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json); eos ids from generation_config.json as well. Nothing is hard-coded, since
LFM2.5-VL-3B's ids differ from the 450M/1.6B ones. Text is always encoded without added special tokens:
BOS comes from the chat template, as in transformers' processor.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from lfm2vl.config import described, json_int, read_json
from lfm2vl.processor.chat import TemplateCompileError, check_templates
from lfm2vl.resolve import LoadError

# The named special tokens transformers passes to chat templates (`special_tokens_map`).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(v):
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    """encode/decode plus special tokens: `bos_token(_id)`, `eos_token(_id)`, `pad_token(_id)`, `eos_token_ids`
    (every id that ends generation), `special_tokens` (the names templates see), `chat_template`."""

    def __init__(self, tok: _HFTokenizer, config: dict | None = None, generation_config: dict | None = None,
                 chat_template: str | dict | None = None):
        self.backend = tok
        cfg = dict(config or {})
        self.config = cfg
        self.special_tokens = named_special_tokens(cfg)
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        gen = generation_config or {}
        eos = gen.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if self.eos_token_id is not None and self.eos_token_id not in eos:
            eos.append(self.eos_token_id)
        self.eos_token_ids: list[int] = eos
        if self.pad_token_id is None and gen.get("pad_token_id") is not None:
            self.pad_token_id = int(gen["pad_token_id"])
        self.padding_side = cfg.get("padding_side", "right")
        self.chat_template = chat_template
        self._max_token_chars: int | None = None
        self._plain: _HFTokenizer | None = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise LoadError(f"no tokenizer.json in {folder}")
        cfg = check_token_settings(folder / "tokenizer_config.json")
        for k, v in check_token_settings(folder / "special_tokens_map.json").items():
            if not cfg.get(k):  # tokenizer_config wins, as in transformers
                cfg[k] = _content(v)
        gen_path = folder / "generation_config.json"
        gen = read_json(gen_path)
        for k in ("eos_token_id", "pad_token_id"):
            v = gen.get(k)
            many = k == "eos_token_id" and isinstance(v, list) and all(map(json_int, v))
            if not (v is None or json_int(v) or many):
                what = "a token id or a list of token ids" if k == "eos_token_id" else "a token id"
                raise LoadError(f"{gen_path}: {k} must be {what}, got {described(v)}")
        try:
            backend = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for any file it cannot parse
            raise LoadError(f"{path} is not a tokenizer file (the JSON that tokenizers / transformers' "
                            f"save_pretrained writes): {e}") from None
        return cls(backend, cfg, gen, load_chat_template(folder, cfg))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (an upper bound over the vocabulary's strings): a text of n
        characters takes at least n / max_token_chars tokens, a bound that costs nothing to check."""
        if self._max_token_chars is None:
            vocab = self.backend.get_vocab(with_added_tokens=True)
            self._max_token_chars = max((len(t) for t in vocab), default=1)
        return self._max_token_chars

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def attr_token(self, name: str, default: str) -> str:
        """A named token from tokenizer_config (e.g. image_token), else transformers' literal fallback."""
        extra = self.config.get("extra_special_tokens")
        v = self.config.get(name) or (extra.get(name) if isinstance(extra, dict) else None)
        return str(_content(v)) if v else default

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    @property
    def special_ids(self) -> dict[str, int]:
        """The added tokens marked special (string -> id): the ones encode() turns into control tokens."""
        return {t.content: i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def encode_plain(self, text: str) -> list[int]:
        """Like encode, but special-token strings in `text` are split like ordinary text (transformers'
        split_special_tokens=True). Uses a copy of the backend, so encode() is never affected, even across threads."""
        if self._plain is None:
            plain = _HFTokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def named_special_tokens(cfg: dict) -> dict[str, str]:
    """The named tokens transformers passes to chat templates (its `special_tokens_map`): the standard ones, the
    named `extra_special_tokens`, and any other `*_token` string setting (e.g. image_token, image_start_token)."""
    out = {k: str(_content(cfg[k])) for k in TEMPLATE_TOKENS if cfg.get(k) is not None}
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, dict):
        out.update({k: str(_content(v)) for k, v in extra.items() if v is not None})
    for k, v in cfg.items():
        if k.endswith("_token") and k not in out and (isinstance(v, str) or (isinstance(v, dict) and "content" in v)):
            out[k] = str(_content(v))
    return out


def check_token_settings(path: Path) -> dict:
    """tokenizer_config.json or special_tokens_map.json read ({} when absent); a LoadError naming the file for a
    standard named token (bos_token, ...) that is not a string or {"content": ...}, extra_special_tokens that is
    not an object or a list, or a padding_side other than right or left."""
    cfg = read_json(path)
    for k in TEMPLATE_TOKENS:
        v = cfg.get(k)
        if v is not None and not isinstance(_content(v), str):
            raise LoadError(f"{path}: {k} must be a token (a string, or an object with \"content\"), "
                            f"got {described(v)}")
    extra = cfg.get("extra_special_tokens")
    if extra is not None and not isinstance(extra, (dict, list)):
        raise LoadError(f"{path}: extra_special_tokens must be an object or a list, got {described(extra)}")
    if cfg.get("padding_side", "right") not in ("right", "left"):
        raise LoadError(f"{path}: padding_side must be 'right' or 'left', got {described(cfg['padding_side'])}")
    return cfg


def load_chat_template(folder: Path, tokenizer_config: dict) -> str | dict | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's field: a string, or named
    templates (a dict name -> template; see `pick_template`). The templates are compiled here, so a syntax error
    is a LoadError naming the file and line, found at load rather than at the first request."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            t, where = jinja.read_text(encoding="utf-8"), jinja
        except UnicodeDecodeError as e:
            raise LoadError(f"{jinja} is not UTF-8 text (byte {e.start}); it should be a Jinja template") from None
    else:
        t, where = read_json(folder / "chat_template.json").get("chat_template"), folder / "chat_template.json"
        if not t:
            t, where = tokenizer_config.get("chat_template"), folder / "tokenizer_config.json"
        if isinstance(t, list):
            if not all(isinstance(d, dict) and isinstance(d.get("name"), str) for d in t):
                raise LoadError(f"{where}: chat_template as a list must hold {{\"name\": ..., \"template\": ...}} "
                                "objects")
            t = {d["name"]: d.get("template") for d in t}
        if not (t is None or isinstance(t, str) or (isinstance(t, dict)
                                                    and all(isinstance(v, str) for v in t.values()))):
            raise LoadError(f"{where}: chat_template must be the template's text (a string) or a list of named "
                            f"templates, got {described(t)}")
    try:
        check_templates(t)
    except TemplateCompileError as e:
        raise LoadError(f"{where}: {e}") from None
    return t


def pick_template(template: str | dict | None, tools=None) -> str | None:
    """transformers' choice among named templates: 'tool_use' when tools are given and it exists, else 'default'."""
    if not isinstance(template, dict):
        return template
    if tools is not None and "tool_use" in template:
        return template["tool_use"]
    if "default" in template:
        return template["default"]
    raise ValueError(f"the checkpoint has named chat templates {sorted(template)} but none is called 'default'")
