"""Bearer token files: one or more tokens, one per line, shared by the agent and the receiver.

The format (docs/configuration.md): blank lines and lines starting with ``#`` are ignored;
every other line, stripped of surrounding whitespace, is one token. A token with whitespace,
control characters or non-ASCII inside is an error: it could not be sent as an HTTP header, and
the agent used to log it when httpx refused the header. Error messages name the file and line,
never the token. The receiver accepts any token in its file; the agent sends the first (so a
rotation is: add the new token to the receiver, move the agent to it, drop the old one).

Imports only the standard library.
"""

from __future__ import annotations

from pathlib import Path

# visible ASCII, no space: what an RFC 6750 token may hold and httpx can put in a header
_ALLOWED = frozenset(chr(c) for c in range(0x21, 0x7F))


def parse_tokens(text: str, source: str) -> tuple[str, ...]:
    """The tokens in ``text`` (a token file's content), in file order.

    Raises ValueError naming ``source`` and the line number (never the token) for a line with
    whitespace, control or non-ASCII characters inside, or when the file holds no token.
    """
    tokens: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not set(line) <= _ALLOWED:
            raise ValueError(f"{source} line {number}: a token must be one word of visible ASCII "
                             "characters (no spaces, tabs, control or non-ASCII characters); "
                             "put several tokens on separate lines")
        tokens.append(line)
    if not tokens:
        raise ValueError(f"{source} holds no token (only blank lines or # comments)")
    return tuple(tokens)


def read_tokens(path: Path) -> tuple[str, ...]:
    """``parse_tokens`` of the file at ``path``. Raises OSError or ValueError (UnicodeDecodeError
    included)."""
    return parse_tokens(path.read_text(encoding="utf-8"), str(path))
