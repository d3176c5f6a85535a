"""The Lark grammar (for llguidance) of a forced tool-call answer: `<|tool_call_start|>[` calls `]<|tool_call_end|>`.

Each call is the function's name and its keyword arguments in the order of the schema's properties, required ones
always, optional ones maybe; each value follows its property's schema, written as the Python literal LFM2 writes:
- enum / const: the listed values; anyOf / oneOf and type lists: alternatives; allOf: its schemas merged;
  $ref: a rule of its own (local pointers "#/$defs/...", "#/definitions/...", "#"), so recursive schemas work;
- integer / number: decimals without exponent (read back unchanged), minimum / maximum / exclusiveMinimum /
  exclusiveMaximum by numrange.py's regexes intersected with the number terminal;
- string: double quotes with the escapes json.dumps writes; minLength / maxLength; pattern and format by llguidance's
  JSON-schema string (its escapes are Python's too);
- boolean True / False, null None; array: items, minItems / maxItems; object: properties and required, or entries
  of additionalProperties' schema when it lists no properties.
Validation keywords this cannot enforce (multipleOf, uniqueItems, not, contains, ...) are a ValueError naming the
function, the place and the keyword: a forced call is always valid against its function's schema. So are parameters
that admit no finite value (finite.py), whose grammar no call could finish.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from ..processor.tools import TOOL_CALL, py_literal
from . import numrange
from .finite import why_infinite

STRING_BODY = r'([^"\\\x00-\x1f]|\\["\\bfnrt])'
TERMINALS = rf"""
STRING: /"{STRING_BODY}*"/
INT: /0|-?[1-9][0-9]{{0,14}}/
NUMBER: /0|-?[1-9][0-9]{{0,14}}|-?(0|[1-9][0-9]{{0,8}})\.[0-9]{{0,3}}[1-9]/
any_value: STRING | NUMBER | "True" | "False" | "None" | any_list | any_dict
any_list: "[" (any_value (", " any_value)*)? "]"
any_dict: "{{" (STRING ": " any_value (", " STRING ": " any_value)*)? "}}"
"""
UNENFORCED = ("multipleOf", "uniqueItems", "contains", "minContains", "maxContains", "prefixItems", "not", "if",
              "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "propertyNames",
              "minProperties", "maxProperties", "patternProperties", "unevaluatedItems", "unevaluatedProperties")
ANNOTATIONS = ("title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly")
_BOUNDS = (("minimum", numrange.at_least, False), ("exclusiveMinimum", numrange.at_least, True),
           ("maximum", numrange.at_most, False), ("exclusiveMaximum", numrange.at_most, True))


class CallGrammar:
    """Builds the rules of one forced answer; one rule per schema node, one per $ref target."""

    def __init__(self):
        self.rules: list[str] = []
        self.n = 0
        self.refs: dict[tuple[str, str], str] = {}
        self.root: Mapping = {}
        self.fn = ""

    def name(self) -> str:
        self.n += 1
        return f"r{self.n}"

    def rule(self, body: str) -> str:
        name = self.name()
        self.rules.append(f"{name}: {body}")
        return name

    def fail(self, where: str, why: str):
        raise ValueError(f"tools: the function {self.fn!r}, {where}: {why}")

    def call(self, fn: Mapping) -> str:
        """The rule of one call of `fn` (a checked function spec)."""
        self.fn, self.root = fn["name"], fn.get("parameters") or {}
        params = self.resolve(self.root, "parameters")
        endless = why_infinite(self.root, untyped_object=True)  # its grammar would leave every call unfinished
        if endless:
            self.fail("parameters", f"they admit no finite value: {endless}")
        bad = [k for k in (params.get("properties") or {}) if not k.isidentifier()]
        if bad:
            self.fail(f"parameter {bad[0]!r}", "LFM2's call format writes arguments as keywords, so each parameter "
                      "name must be a Python identifier")
        args = self.fields(params, "parameters", kwargs=True)
        return self.rule(json.dumps(f"{self.fn}(") + (f" {args}" if args else "") + ' ")"')

    def resolve(self, schema: Any, where: str) -> Mapping:
        """The schema with allOf merged and unenforceable keywords refused (a $ref stays for value())."""
        if isinstance(schema, bool) or schema is None:
            return {} if schema in (True, None) else self.fail(where, "the schema false allows no value")
        if not isinstance(schema, Mapping):
            self.fail(where, f"a schema must be an object, got {type(schema).__name__}")
        bad = [k for k in UNENFORCED if k in schema]
        if bad:
            self.fail(where, f"{bad[0]!r} cannot be enforced in a forced tool call; use tool_choice='auto' or "
                      "drop the keyword")
        if isinstance(schema.get("items"), list):
            self.fail(where, "'items' as a list (tuple validation) cannot be enforced in a forced tool call")
        if "allOf" not in schema:
            return schema
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            self.fail(where, "allOf must be a non-empty list of schemas")
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for i, part in enumerate(parts):
            part = self.resolve(self.deref(part, f"{where}.allOf[{i}]"), f"{where}.allOf[{i}]")
            for k, v in part.items():
                if k == "properties" and isinstance(merged.get(k), Mapping):
                    merged[k] = {**merged[k], **v}
                elif k == "required":
                    merged[k] = list(dict.fromkeys([*merged.get(k, []), *v]))
                elif k in ANNOTATIONS:  # they constrain nothing: the first one stands
                    merged.setdefault(k, v)
                elif k in merged and merged[k] != v:
                    self.fail(f"{where}.allOf[{i}]", f"{k!r} differs from another allOf schema's; such an allOf "
                              "cannot be merged")
                else:
                    merged[k] = v
        return merged

    def deref(self, schema: Any, where: str) -> Any:
        """The schema a $ref-only node points at (for merging allOf); other nodes unchanged."""
        while isinstance(schema, Mapping) and "$ref" in schema:
            schema = self.target(schema["$ref"], where)
        return schema

    def target(self, ref: Any, where: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            self.fail(where, f"$ref={ref!r} is not supported; only pointers into the same schema ('#/$defs/Name')")
        node: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or part not in node:
                self.fail(where, f"$ref={ref!r} points at nothing in the function's parameters")
            node = node[part]
        return node

    def value(self, schema: Any, where: str) -> str:
        """The rule (or terminal) of one value."""
        if isinstance(schema, Mapping) and "$ref" in schema:
            key = (self.fn, schema["$ref"])
            if key not in self.refs:
                self.refs[key] = name = self.name()
                self.rules.append(f"{name}: {self.value(self.target(schema['$ref'], where), schema['$ref'])}")
            return self.refs[key]
        schema = self.resolve(schema, where)
        if "const" in schema:
            return self.alts([schema["const"]], where)
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self.alts(schema["enum"], where)
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                rest = {k: v for k, v in schema.items() if k != key}
                return self.rule(" | ".join(self.value({"allOf": [rest, s]} if rest else s, f"{where}.{key}[{i}]")
                                            for i, s in enumerate(schema[key])))
        t = schema.get("type")
        if isinstance(t, list) and t:
            return self.rule(" | ".join(self.value({**schema, "type": x}, where) for x in t))
        if t in ("integer", "number"):
            return self.number(schema, where, "INT" if t == "integer" else "NUMBER")
        if t == "string":
            return self.string(schema)
        if t == "boolean":
            return self.rule('"True" | "False"')
        if t == "null":
            return '"None"'
        if t == "array":
            item = self.value(schema.get("items"), f"{where}.items") if "items" in schema else "any_value"
            lo = schema.get("minItems") if isinstance(schema.get("minItems"), int) else 0
            hi = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else None
            return self.rule(repeat(item, lo, hi))
        if t == "object" or "properties" in schema:
            return self.rule('"{" ' + self.fields(schema, where, kwargs=False) + ' "}"')
        return "any_value"

    def alts(self, values: list, where: str) -> str:
        try:
            texts = list(dict.fromkeys(py_literal(v) for v in values))
        except ValueError as e:
            self.fail(where, f"enum/const holds a value that is not JSON ({e})")
        return self.rule(" | ".join(json.dumps(t) for t in texts))

    def number(self, schema: Mapping, where: str, terminal: str) -> str:
        regexes = []
        for key, side, strict in _BOUNDS:
            v = schema.get(key)
            if v is None:
                continue
            if isinstance(v, bool):  # draft 4: exclusiveMinimum: true makes minimum exclusive
                continue
            b = numrange.bound(v, f"{where}.{key}")
            strict = strict or schema.get("exclusive" + key[0].upper() + key[1:]) is True
            regexes.append(side(b, strict))
        if not regexes:
            return terminal
        name = f"N{self.n + 1}"
        self.n += 1
        self.rules.append(f"{name}: " + " & ".join([*(f"/{r}/" for r in regexes), terminal]))
        return name

    def string(self, schema: Mapping) -> str:
        if "pattern" in schema or "format" in schema:
            keep = {k: schema[k] for k in ("pattern", "format", "minLength", "maxLength") if k in schema}
            return self.rule("%json " + json.dumps({"type": "string", **keep}))
        lo, hi = schema.get("minLength"), schema.get("maxLength")
        if isinstance(lo, int) or isinstance(hi, int):
            lo = lo if isinstance(lo, int) and lo >= 0 else 0
            hi = f"{hi}" if isinstance(hi, int) and hi >= lo else ""
            return self.rule(f'/"{STRING_BODY}{{{lo},{hi}}}"/')
        return "STRING"

    def fields(self, schema: Mapping, where: str, kwargs: bool) -> str:
        """Keyword arguments (or dict entries) of an object schema, in property order, separated by ", ": required
        ones always, optional ones maybe. Without properties: no arguments; a dict of additionalProperties' values
        (any values when it is absent or true, none when false)."""
        props = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        key = (lambda k: json.dumps(f"{k}=")) if kwargs else (lambda k: json.dumps(json.dumps(k) + ": "))
        items = [(k, key(k) + " " + self.value(v, f"{where}.{k}")) for k, v in props.items()]
        if not items:
            extra = schema.get("additionalProperties", True)
            if kwargs or extra is False:
                return ""
            entry = 'STRING ": " ' + ("any_value" if extra is True else self.value(extra, f"{where}.*"))
            return f"({entry} (\", \" {entry})*)?"
        # first: the entries from one on, the first written without ", " before it; rest: each with ", " before
        # it; None past the end (nothing). A rule whose entries are all optional may be empty.
        first = rest = None
        nullable = True  # every entry after this one is optional
        for k, kv in reversed(items):
            tail = f"{kv} {rest}" if rest else kv
            if k in required:
                rest, first = self.rule(f'", " {tail}'), self.rule(tail)
                nullable = False
            elif rest is None:
                rest, first = self.rule(f'(", " {kv})?'), self.rule(f"({kv})?")
            else:
                opt = "?" if nullable else ""
                rest, first = (self.rule(f'((", " {tail}) | {rest}){opt}'),
                               self.rule(f"(({tail}) | {first}){opt}"))
        return first


def repeat(item: str, lo: int, hi: int | None) -> str:
    """`[` lo..hi items `]` separated by ", "."""
    if hi is not None and hi < lo:
        hi = lo
    if hi == 0:
        return '"[" "]"'
    rest = f'(", " {item})'
    more = (f"{rest}~{max(lo - 1, 0)}..{hi - 1}" if hi is not None else
            (f"{rest}~{lo - 1}" + f" {rest}*" if lo > 1 else f"{rest}*"))
    body = f"{item} {more}"
    return f'"[" {body} "]"' if lo >= 1 else f'"[" ({body})? "]"'


def call_grammar(fns: list[dict], names: list[str], parallel: bool = True) -> str:
    """The Lark grammar of `<|tool_call_start|>[` calls of `names` `]<|tool_call_end|>` (fns: check_tools); one
    call only unless `parallel`. ValueError names the function and the keyword a forced call cannot enforce."""
    g = CallGrammar()
    by_name = {f["name"]: f for f in fns}
    call = g.rule(" | ".join(g.call(by_name[name]) for name in names))
    more = f' (", " {call})*' if parallel else ""
    start = f'start: {TOOL_CALL[0]} "[" {call}{more} "]" {TOOL_CALL[1]}'
    return "\n".join([start, *g.rules]) + TERMINALS
