"""The one exception the config layer raises: a one-line, actionable message."""

from __future__ import annotations


class ConfigError(Exception):
    """A config file (or a file it references) is unusable.

    ``str(err)`` is one line: ``<source>: <yaml path>: <what was expected, what was found>``,
    for example ``gateway.yaml: tun.mtu: expected an integer 576..65535, got 'big'``.
    """

    def __init__(self, source: str, path: str, detail: str) -> None:
        self.source = source
        """The file (or caller-given name) the error is in."""
        self.path = path
        """Dotted YAML path such as ``policy.rules[2].ports``; empty for the whole document."""
        self.detail = detail
        """What was expected and what was found."""
        where = f"{source}: {path}" if path else source
        super().__init__(_one_line(f"{where}: {detail}"))


def _one_line(text: str) -> str:
    # Messages embed user input; never let it break the one-line contract.
    return " ".join(text.split())
