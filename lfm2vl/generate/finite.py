"""Whether a JSON schema admits a finite value: a schema whose every value must contain another value of itself
(`{"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}`, an array of itself with minItems >= 1,
a $ref that points at itself) admits none, and a grammar built from it leaves every answer unfinished. The grammar
engines do not tell (llguidance compiles such a schema and reaches a dead end while generating), so it is found
here, before anything runs.

Each schema node is a gate over the nodes it needs: AND of its $ref target, its allOf parts, an OR of its anyOf
(oneOf) parts and an OR of its types (a scalar type, enum or const: always finite; an object: AND of its required
properties' schemas; an array: finite when minItems is 0, else when its items are). The gates that can be true are
found by propagating from the ones that need nothing (a least fixed point, linear in the schema's size). Anything
this does not model (an unresolvable $ref, prefixItems, patternProperties, a keyword of another draft) counts as
finite: the answer is "no finite value" only when that is certain.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Mapping

SCALARS = ("string", "number", "integer", "boolean", "null")


class _Gates:
    def __init__(self, root: Any, untyped_object: bool):
        self.root, self.untyped_object = root, untyped_object
        self.need: list[int] = []  # inputs still to become true (AND: all of them; OR: one)
        self.users: list[list[int]] = []  # the gates that take this one as an input
        self.of: dict[int, int] = {}  # id(schema node) -> its gate
        self.todo: list[tuple[int, Mapping]] = []  # nodes given a gate, not yet wired
        self.refs: list[tuple[str, int]] = []  # ($ref, the gate of its target), in the order met
        self.true_ = self.new()
        self.wire(self.true_, "and", [])
        self.false_ = self.new()
        self.wire(self.false_, "or", [])

    def new(self) -> int:
        self.need.append(0)
        self.users.append([])
        return len(self.need) - 1

    def wire(self, gate: int, kind: str, inputs: list[int]) -> int:
        self.need[gate] = len(inputs) if kind == "and" else 1  # an OR without inputs is never true
        for i in inputs:
            self.users[i].append(gate)
        return gate

    def node(self, schema: Any) -> int:
        """The gate of a schema node (wired later, so that recursion through $ref ends)."""
        if schema is False:
            return self.false_
        if not isinstance(schema, Mapping):
            return self.true_  # true, or not a schema (the engine reports that)
        gate = self.of.get(id(schema))
        if gate is None:
            gate = self.of[id(schema)] = self.new()
            self.todo.append((gate, schema))
        return gate

    def target(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return True
        node: Any = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, Mapping) and part in node:
                node = node[part]
            else:
                return True
        return node

    def build(self) -> int:
        top = self.node(self.root)
        while self.todo:
            gate, schema = self.todo.pop()
            inputs = []
            if "$ref" in schema:
                t = self.node(self.target(schema["$ref"]))
                self.refs.append((schema["$ref"], t))
                inputs.append(t)
            if isinstance(schema.get("allOf"), list):
                inputs += [self.node(s) for s in schema["allOf"]]
            for key in ("anyOf", "oneOf"):
                if isinstance(schema.get(key), list) and schema[key]:
                    inputs.append(self.wire(self.new(), "or", [self.node(s) for s in schema[key]]))
            inputs.append(self.types(schema))
            self.wire(gate, "and", inputs)
        return top

    def types(self, schema: Mapping) -> int:
        """The OR over the types the node allows."""
        t = schema.get("type")
        if "const" in schema or "enum" in schema:
            return self.true_
        if t is None and self.untyped_object and "properties" in schema:
            t = "object"
        types = [t] if isinstance(t, str) else t if isinstance(t, list) and t else None
        if types is None or any(x not in ("object", "array") for x in types):
            return self.true_  # any type, or a scalar one (or one the engine refuses)
        alts = []
        if "object" in types:
            props = schema.get("properties") if isinstance(schema.get("properties"), Mapping) else {}
            required = schema.get("required") if isinstance(schema.get("required"), list) else []
            alts.append(self.wire(self.new(), "and", [self.node(props[r]) for r in required
                                                      if isinstance(r, str) and r in props]))
        if "array" in types:
            lo = schema.get("minItems")
            if not isinstance(lo, int) or isinstance(lo, bool) or lo <= 0 or "prefixItems" in schema:
                alts.append(self.true_)
            else:
                alts.append(self.node(schema.get("items", True)))
        return self.wire(self.new(), "or", alts)

    def solve(self) -> list[bool]:
        true = [False] * len(self.need)
        ready = deque(g for g, n in enumerate(self.need) if n == 0)
        for g in ready:
            true[g] = True
        while ready:
            g = ready.popleft()
            for u in self.users[g]:
                self.need[u] -= 1
                if self.need[u] <= 0 and not true[u]:
                    true[u] = True
                    ready.append(u)
        return true


def why_infinite(schema: Any, untyped_object: bool = False) -> str | None:
    """Why `schema` admits no finite JSON value, or None when it may admit one. untyped_object: a node with
    properties and no type is an object (as in a tool call's grammar) rather than any value."""
    gates = _Gates(schema, untyped_object)
    top = gates.build()
    true = gates.solve()
    if true[top]:
        return None
    endless = [ref for ref, t in gates.refs if not true[t]]
    if endless:
        return (f"each value of $ref {endless[0]!r} must contain another one (through a required property, a "
                "non-empty array or the $ref itself), so no value ever ends")
    return "no value satisfies it"
