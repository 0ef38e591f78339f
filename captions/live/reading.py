"""Which languages a room's captions are translated into: what its readers ask for, and what its
settings allow (issue 26; docs/translation.md).

* Readers ask through attributes: a participant's own ``captions.reading`` (a visible relay, or any
  participant), and, on the captioner, one ``captions.reading.<relay>`` entry per viewer server, set
  through the server API, that counts until it expires (captions/protocol.py `reading_value`).
* A room's metadata ``{"captions": {"translate_to": [...], "source_language": "fr"}}`` (only the
  server API sets room metadata) replaces the configured languages and may fix the speakers'.

Everything here is parsed as hostile: at most `MAX_LANGUAGES` codes from the first
`MAX_LANGUAGES_TEXT` characters, `MAX_RELAYS` entries, junk ignored. The worker then takes only the
languages it is configured for (translation.py), so no reader can make it do more.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from captions.config import language_code
from captions.protocol import ATTR_READING, ATTR_READING_FROM, parse_reading_value

MAX_LANGUAGES = 16
"""Languages read from one attribute or room setting (more are ignored)."""
MAX_LANGUAGES_TEXT = 256
"""Characters of a ``captions.reading`` attribute looked at (the rest is ignored)."""
MAX_RELAYS = 16
"""``captions.reading.<relay>`` entries looked at on the captioner (viewer servers of one room)."""


def parse_languages(value: Any) -> tuple[str, ...]:
    """Language codes from a comma-separated string or a list, in order, without repeats or junk;
    at most MAX_LANGUAGES of them, from the first MAX_LANGUAGES_TEXT characters of a string."""
    if isinstance(value, str):
        items: Iterable[Any] = value[:MAX_LANGUAGES_TEXT].split(",")
    elif isinstance(value, list):
        items = value[:MAX_LANGUAGES * 4]
    else:
        return ()
    codes: list[str] = []
    for item in items:
        code = language_code(item)
        if code is not None and code not in codes:
            codes.append(code)
    return tuple(codes[:MAX_LANGUAGES])


def room_settings(metadata: str, default_targets: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """(target languages, configured source language or None) from room metadata
    ``{"captions": {"translate_to": [...], "source_language": "fr"}}``; other metadata (other
    applications use it too: anything, JSON or not) leaves the defaults."""
    try:
        data = json.loads(metadata) if metadata else None
    except (ValueError, RecursionError):
        return default_targets, None
    settings = data.get("captions") if isinstance(data, dict) else None
    if not isinstance(settings, dict):
        return default_targets, None
    targets = default_targets
    if "translate_to" in settings and isinstance(settings["translate_to"], (str, list)):
        targets = parse_languages(settings["translate_to"])
    return targets, language_code(settings.get("source_language"))


def languages_asked(attributes: Mapping[str, str], now: float) -> tuple[tuple[str, ...], float | None]:
    """The languages a participant's attributes ask for (its own ``captions.reading`` and the
    unexpired ``captions.reading.<relay>`` entries), and when the first of those entries expires
    (Unix seconds; None without one)."""
    asked = list(parse_languages(attributes.get(ATTR_READING, "")))
    renew_by = None
    for key in sorted(key for key in attributes if key.startswith(ATTR_READING_FROM))[:MAX_RELAYS]:
        languages, expires = parse_reading_value(attributes[key])
        if expires > now:
            asked += [code for code in parse_languages(languages) if code not in asked]
            renew_by = expires if renew_by is None else min(renew_by, expires)
    return tuple(asked[:MAX_LANGUAGES]), renew_by
