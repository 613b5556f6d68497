"""Lexer, parser and printer for MLIR-style pipeline strings: `a{k=v k2=v1,v2},b`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

OptionValue = tuple[str, ...]
"""An option's raw value: one or more comma-separated words, typed later by the pass."""


class PipelineSyntaxError(ValueError):
    """A pipeline string that does not follow the grammar; the message shows where."""

    def __init__(self, text: str, pos: int, message: str) -> None:
        pointer = " " * pos + "^"
        super().__init__(f"{message} at column {pos + 1}:\n  {text}\n  {pointer}")
        self.text = text
        self.pos = pos


@dataclass(frozen=True)
class PassSpec:
    """One element of a pipeline: a pass (or named pipeline) name and its raw options.

    `analysis` is set for the pseudo-passes `require<name>` and `invalidate<name>`.
    """

    name: str
    options: dict[str, OptionValue] = field(default_factory=dict)
    analysis: str | None = None

    def __str__(self) -> str:
        if self.analysis is not None:
            return f"{self.name}<{self.analysis}>"
        if not self.options:
            return self.name
        body = " ".join(_format_option(k, v) for k, v in self.options.items())
        return f"{self.name}{{{body}}}"

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.options.items()), self.analysis))


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_BARE = re.compile(r"[^\s,{}\"<>=]+")


def _format_value(word: str) -> str:
    if word and _BARE.fullmatch(word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def format_words(value: OptionValue) -> str:
    """An option value as written in a pipeline: comma-separated, quoted where needed."""
    return ",".join(_format_value(w) for w in value)


def _format_option(key: str, value: OptionValue) -> str:
    return f"{key}={format_words(value)}"


def format_pipeline(specs: list[PassSpec]) -> str:
    """Print a pipeline; `parse_pipeline(format_pipeline(p)) == p`."""
    return ",".join(str(s) for s in specs)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> PipelineSyntaxError:
        return PipelineSyntaxError(self.text, self.pos, message)

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "end of input"
            raise self.error(f"expected {char!r}, found {found}")
        self.pos += 1

    def name(self, what: str) -> str:
        self.skip_ws()
        m = _NAME.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {'an' if what[0] in 'aeiou' else 'a'} {what}")
        self.pos = m.end()
        return m.group(0)

    def word(self) -> str:
        self.skip_ws()
        if self.peek() == '"':
            return self.quoted()
        m = _BARE.match(self.text, self.pos)
        if not m:
            raise self.error("expected an option value")
        self.pos = m.end()
        return m.group(0)

    def quoted(self) -> str:
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if ch == '"':
                self.pos += 1
                return "".join(out)
            out.append(ch)
            self.pos += 1
        raise self.error("unterminated string")

    def element(self) -> PassSpec:
        name = self.name("pass name")
        if self.peek() == "<":
            self.pos += 1
            analysis = self.name("analysis name")
            self.expect(">")
            return PassSpec(name, {}, analysis)
        options: dict[str, OptionValue] = {}
        if self.peek() == "{":
            self.pos += 1
            while self.peek() != "}":
                if not self.peek():
                    raise self.error("expected '}'")
                key_pos = self.pos
                key = self.name("option name")
                if key in options:
                    self.pos = key_pos
                    raise self.error(f"option {key!r} given twice")
                if self.peek() == "=":
                    self.pos += 1
                    words = [self.word()]
                    while self.peek() == ",":
                        self.pos += 1
                        words.append(self.word())
                    options[key] = tuple(words)
                else:
                    options[key] = ("true",)
            self.pos += 1
        return PassSpec(name, options)

    def pipeline(self) -> list[PassSpec]:
        specs: list[PassSpec] = []
        if not self.peek():
            return specs
        specs.append(self.element())
        while self.peek() == ",":
            self.pos += 1
            specs.append(self.element())
        if self.peek():
            raise self.error(f"unexpected {self.peek()!r}")
        return specs


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse `name{opt=value other=v1,v2},name2` into pass specs.

    Raises:
        PipelineSyntaxError: the string does not follow the grammar.
    """
    return _Parser(text).pipeline()
