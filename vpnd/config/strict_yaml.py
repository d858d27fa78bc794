"""YAML parsing that refuses what PyYAML silently accepts: duplicate keys, above all.

Only ``yaml.SafeLoader`` machinery is used; no tag can construct an arbitrary object.
"""

from __future__ import annotations

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from vpnd.config.errors import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader subclass, so that nothing registered here leaks into yaml.SafeLoader."""


def join_key(path: str, key: str) -> str:
    """``tun`` + ``mtu`` -> ``tun.mtu``; a key that is not a plain word is quoted."""
    shown = key if key.replace("_", "a").replace("-", "a").isalnum() else repr(key)
    return f"{path}.{shown}" if path else shown


def join_index(path: str, index: int) -> str:
    return f"{path}[{index}]"


def parse_yaml(text: str, *, source: str) -> object:
    """Parse one YAML document. An empty document, several documents, invalid YAML and
    duplicate keys all raise ConfigError; the result is plain dicts/lists/scalars."""
    loader: _StrictLoader | None = None
    try:
        # The constructor already scans for forbidden characters, so it is inside the try.
        loader = _StrictLoader(text)
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(source, "", "the file is empty; expected a YAML mapping of settings")
        _check_duplicates(node, "", source, set())
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        raise ConfigError(source, "", _describe_yaml_error(err)) from None
    except yaml.reader.ReaderError as err:
        detail = f"character #x{err.character:04x} at offset {err.position}: {err.reason}"
        raise ConfigError(source, "", f"invalid YAML: {detail}") from None
    except yaml.YAMLError as err:
        raise ConfigError(source, "", f"invalid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(source, "", "invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError, TypeError) as err:
        # SafeConstructor lets a few of these escape, e.g. the timestamp 2024-13-45.
        raise ConfigError(source, "", f"invalid YAML value: {err}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _describe_yaml_error(err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark or err.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = err.problem or err.context or "syntax error"
    if err.context and err.problem:
        what = f"{err.context}, {err.problem}"
    return f"{where}invalid YAML: {what}"


def _check_duplicates(node: Node, path: str, source: str, seen: set[int]) -> None:
    # Aliases make the node graph a DAG (or even cyclic): visit each node once.
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode):
                child = join_key(path, str(key_node.value))
                if key_node.tag != _MERGE_TAG:
                    ident = (key_node.tag, str(key_node.value))
                    line = key_node.start_mark.line + 1
                    if ident in first:
                        raise ConfigError(
                            source,
                            child,
                            f"duplicate key {key_node.value!r} at line {line} (first at line "
                            f"{first[ident]}); YAML would silently keep only the last one",
                        )
                    first[ident] = line
            else:
                child = join_key(path, "?")
            _check_duplicates(value_node, child, source, seen)
    elif isinstance(node, SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicates(item, join_index(path, index), source, seen)
