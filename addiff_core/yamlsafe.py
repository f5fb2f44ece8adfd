"""YAML for files a hospital or a coordinator hands us: bounded, plain, unambiguous.

``yaml.safe_load`` keeps aliases, and a few hundred bytes of nested ones ("billion laughs") expand
into gigabytes once the value is walked or repr()ed (BENCHMARKS.md, "Hostile input: cost bounds").
:func:`load` refuses aliases while composing, duplicate keys (PyYAML silently keeps the last) and
files over :data:`MAX_BYTES`. Every YAML the project reads goes through here
(``tests/test_hostile_input.py`` greps for other ``yaml.*load``).
"""
from __future__ import annotations

from typing import Any

import yaml

from .limits import open_regular

MAX_BYTES = 1_000_000  # site files, plan.yaml and model configs are a few kB


class YamlRefused(ValueError):
    """The text is not plain YAML we accept; the message is one short line."""


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader without aliases or duplicate keys."""

    def compose_node(self, parent, index):  # noqa: D401 - yaml API
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key_node.value[:60]!r}", key_node.start_mark)
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(e, "problem", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return f"not valid YAML{where}: {str(what)[:200]}"


def load(text: str | bytes) -> Any:
    """Parse one YAML document; raises :class:`YamlRefused` (one line) for anything we refuse."""
    if len(text) > MAX_BYTES:
        raise YamlRefused(f"too large for a configuration file ({len(text)} bytes; at most {MAX_BYTES})")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise YamlRefused("not a UTF-8 text file") from None
    try:
        return yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise YamlRefused(_problem(e)) from None
    except RecursionError:
        raise YamlRefused("nested too deeply") from None


def load_file(path) -> Any:
    """:func:`load` of a file, reading at most MAX_BYTES + 1 bytes. Only a regular file is read (a
    FIFO would block for ever): anything else is an ``OSError`` whose ``strerror`` says what it is."""
    with open_regular(path) as fh:
        data = fh.read(MAX_BYTES + 1)
    return load(data)
