"""Making untrusted text safe to show: in a log line, an Event, an HTTP body, an error. Pure.

The agent's input (a Secret, a node file) may come from someone less trusted than the node.
Whatever of it reaches an operator is shown with control characters escaped, so it cannot
forge log lines or terminal output, and registry keys are shown without the `user:pass@`
a URL may carry.
"""

import re
from typing import Final

#: C0 and C1 controls, DEL, the Unicode line and paragraph separators, lone surrogates.
_UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: `scheme://user:password@` or `user:password@` before a host. Up to the last `@`: a careless
#: password may hold `/` or `@` itself, and showing too little of a key is harmless.
_USERINFO: Final = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<userinfo>.*)@", re.S)
#: `scheme://user:password@` anywhere in a text (an error that quotes a URL).
_URL_USERINFO: Final = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]*@")
#: How much of a registry key an error shows.
KEY_DISPLAY_LIMIT: Final = 120


def printable(text: str) -> str:
    """`text` with every control character escaped (`\\n`, `\\x1b`, `\\u2028`)."""
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def without_userinfo(key: str) -> str:
    """A registry key or URL with any `user:password@` before the host replaced by `***@`."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme') or ''}***@", key, count=1)


def without_url_userinfo(text: str) -> str:
    """`text` with the `user:password@` of every URL in it replaced by `***@` (a kubeconfig's
    server URL may carry them, and errors of HTTP libraries quote URLs)."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)


def has_userinfo(key: str) -> bool:
    """Whether a registry key carries `user[:password]@` before its host."""
    return _USERINFO.match(key) is not None


def shown_key(key: str) -> str:
    """A registry key as an error or log line may show it: no userinfo, escaped, bounded."""
    shown = printable(without_userinfo(key))
    if len(shown) > KEY_DISPLAY_LIMIT:
        return shown[: KEY_DISPLAY_LIMIT - 1] + "…"
    return shown


def bounded(text: str, limit: int) -> str:
    """`text` in at most `limit` characters: a longer one is cut at a word boundary (mid-word
    only when there is none in the second half) and ends saying how much was left out,
    `... …(812 more characters)`. `limit` must leave room for that note (~25 characters)."""
    if len(text) <= limit:
        return text
    room = max(limit - len(f" …({len(text)} more characters)"), 1)
    cut = text.rfind(" ", 0, room + 1)
    kept = text[: cut if cut > room // 2 else room].rstrip()
    return f"{kept} …({len(text) - len(kept)} more characters)"
