"""Bounds on what is read from files and flags: finite numbers, bounded sizes, bounded nesting, short quotes.

Why one module: a value read from a user's file or command line reaches allocations (a rank becomes the width of
a mask), recursive parsers (JSON or YAML nesting becomes Python recursion) and error messages (a bad value is
quoted back). Unbounded, a malformed or hostile file gives NaN outputs, a `RecursionError`, a terabyte
allocation or a gigabyte-long message instead of a clear error. Readers check their inputs here before using
them; every check raises `ValueError` (the callers' error types derive from it) with a message naming the input.
"""

from __future__ import annotations

import json
import math
import numbers
import pickletools
import re
import reprlib

# Wider than any projection of the supported models (the widest, FLUX's MLP, has 12288 outputs): a larger rank
# can only come from a typo or a damaged file, and would size the rank masks.
MAX_RANK = 1 << 16
# Our files nest two levels deep (metrics.json four); anything much deeper is not one of them.
MAX_NESTING = 32
# The largest text a reader parses as JSON or YAML: settings and prompt lists, never tensors.
MAX_TEXT_CHARS = 1 << 22

# The largest pickle stream (a torch file's `data.pkl`: names and tensor layouts, never tensor data) that is read.
MAX_PICKLE_BYTES = 1 << 20
# Pickle opcodes that add to an object already on the stack instead of making a new one.
_PICKLE_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}

_QUOTE = reprlib.Repr()  # attributes rather than keywords: Python 3.11's Repr takes none
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 2, 240, 240  # room for whole module paths
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 6
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def quote(value) -> str:
    """`repr(value)` cut to a few hundred characters, for error messages about values read from files."""
    return _QUOTE.repr(value)


def finite_number(value, name: str, minimum: float | None = None, *, exclusive: bool = False) -> float:
    """`value` as a float; `ValueError` naming `name` unless it is a finite real number (>= or > `minimum`)."""
    bound = "" if minimum is None else f" {'>' if exclusive else '>='} {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number{bound}, got {quote(value)}.")
    number = float(value)
    too_small = minimum is not None and (number <= minimum if exclusive else number < minimum)
    if not math.isfinite(number) or too_small:
        raise ValueError(f"{name} must be a finite number{bound}, got {quote(value)}.")
    return number


def check_text_size(text: str, what: str, max_chars: int = MAX_TEXT_CHARS) -> None:
    if len(text) > max_chars:
        raise ValueError(f"{what} is {len(text):,} characters long; at most {max_chars:,} are read.")


def check_nesting(text: str, what: str) -> None:
    """Refuse a JSON (or YAML flow) text whose brackets nest deeper than `MAX_NESTING`, counted without
    recursion; brackets inside double-quoted strings do not count."""
    depth = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_NESTING:
            raise ValueError(f"{what} nests deeper than {MAX_NESTING} levels; it is not a file of this kind.")


def load_json(text: str, what: str, max_chars: int = MAX_TEXT_CHARS):
    """`json.loads(text)` with the size and nesting bounded first; `ValueError` naming `what` on any problem.

    Non-finite numbers (`NaN`, `Infinity`, not JSON but accepted by Python's parser) are refused too.
    """
    check_text_size(text, what, max_chars)
    check_nesting(text, what)

    def refuse_constant(name):
        raise ValueError(f"{what} holds {name}, which is not a JSON number.")

    try:
        return json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON: {error}") from None


def check_pickle_nesting(stream: bytes, what: str) -> None:
    """Refuse a pickle stream longer than `MAX_PICKLE_BYTES` or whose objects nest deeper than `MAX_NESTING`,
    found by walking its opcodes without building any object: hashing or printing a deeply nested object recurses
    in C, past Python's recursion limit, and crashes the interpreter."""
    if len(stream) > MAX_PICKLE_BYTES:
        raise ValueError(f"{what} is {len(stream):,} bytes; at most {MAX_PICKLE_BYTES:,} are read.")
    stack: list[int | None] = []  # the nesting depth of each object on the unpickler's stack; None for a mark
    memo: dict = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name, before = opcode.name, opcode.stack_before
            if name == "MARK":
                stack.append(None)
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
                continue
            if name == "DUP":
                stack.append(stack[-1])
                continue
            popped = []
            if pickletools.markobject in before:
                while stack[-1] is not None:
                    popped.append(stack.pop())
                stack.pop()
                before = before[: before.index(pickletools.markobject)]
            popped += [stack.pop() for _ in before]
            if name in _PICKLE_IN_PLACE:  # the container, deepest in the stack, keeps its place
                container = popped.pop()
                depth = max(container, 1 + max(popped, default=-1))
            else:
                depth = 1 + max(popped, default=-1)
            if depth > MAX_NESTING:
                raise ValueError(f"{what} nests deeper than {MAX_NESTING} levels; it is not a file of this kind.")
            stack.extend(depth for _ in opcode.stack_after)
    except (IndexError, KeyError, TypeError) as error:  # an opcode without its operands, an unknown memo entry
        raise ValueError(f"{what} is not a valid pickle stream ({type(error).__name__}).") from None
