"""PII masking of pair texts: e-mail addresses, IPv4/IPv6 addresses, Luhn-valid card numbers, phone numbers.

Runs on every pair when it is created (workers/pairing/consumer.py, workers/pairing/generation.py) and on every
KTO row at export (workers/pairing/datasets.py); what was masked is counted by kind (quality.pii_field).
Tool calls keep their structure: only the strings inside their JSON arguments are masked.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import orjson

from workers.pairing.rules import Message, PairRecord

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\d)"
)
_IPV6_CANDIDATE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_CARD_CANDIDATE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE_CANDIDATE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?![\w])"
    r"|(?<![\w+])\+\d{8,15}(?!\w)"
)
_ISO_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$")
_DIGIT_RUN = re.compile(r"\d[\d\s().+-]{5,}\d")  # IPv4, cards and phones all contain one
_HEX_COLON = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]|::")  # every IPv6 address contains one


def _maybe_pii(text: str) -> bool:
    """Cheap test that every text holding any of the patterns passes: most texts stop here."""
    return "@" in text or (":" in text and _HEX_COLON.search(text) is not None) or _DIGIT_RUN.search(text) is not None


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _mask_cards(text: str, counts: Counter[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            counts["card"] += 1
            return "[CARD]"
        return match.group()

    return _CARD_CANDIDATE.sub(replace, text)


def _mask_phones(text: str, counts: Counter[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        value = match.group()
        digits = sum(c.isdigit() for c in value)
        groups = len(re.findall(r"\d+", value))
        looks_like_phone = value.startswith("+") or "(" in value or groups >= 3 or digits >= 10
        if 7 <= digits <= 15 and looks_like_phone and not _ISO_DATE.match(value):
            counts["phone"] += 1
            return "[PHONE]"
        return value

    return _PHONE_CANDIDATE.sub(replace, text)


def _mask_ipv6(text: str, counts: Counter[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        value = match.group()
        if sum(c not in ":" for c in value) < 3:
            return value
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return value
        counts["ip"] += 1
        return "[IP]"

    return _IPV6_CANDIDATE.sub(replace, text)


def scrub_pii(text: str, counts: Counter[str] | None = None) -> tuple[str, Counter[str]]:
    """Mask e-mail addresses, IPs, Luhn-valid card numbers and phone numbers; count what was masked."""
    counts = counts if counts is not None else Counter()
    if not _maybe_pii(text):
        return text, counts

    def mask(pattern: re.Pattern[str], label: str, kind: str) -> Callable[[str], str]:
        def run(value: str) -> str:
            result, n = pattern.subn(label, value)
            if n:
                counts[kind] += n
            return result

        return run

    if "@" in text:
        text = mask(_EMAIL, "[EMAIL]", "email")(text)
    text = mask(_IPV4, "[IP]", "ip")(text)
    if ":" in text:
        text = _mask_ipv6(text, counts)
    text = _mask_cards(text, counts)
    text = _mask_phones(text, counts)
    return text, counts


@lru_cache(maxsize=8192)
def _scrubbed(text: str) -> tuple[str, tuple[tuple[str, int], ...]]:
    """scrub_pii memoized: the same prompts and responses recur across many pairs."""
    out, counts = scrub_pii(text)
    return out, tuple(counts.items())


def _scrub_text(text: str, counts: Counter[str]) -> str:
    out, found = _scrubbed(text)
    for kind, n in found:
        counts[kind] += n
    return out


def _scrub_json(value: Any, counts: Counter[str]) -> Any:
    """Every string in a JSON value scrubbed (keys and numbers kept: the value stays valid JSON)."""
    if isinstance(value, str):
        return _scrub_text(value, counts)
    if isinstance(value, list):
        return [_scrub_json(item, counts) for item in value]
    if isinstance(value, dict):
        return {key: _scrub_json(item, counts) for key, item in value.items()}
    return value


def _scrub_calls(calls: list[dict[str, Any]], counts: Counter[str]) -> list[dict[str, Any]]:
    """Tool calls with the strings inside their arguments scrubbed (arguments that are not JSON as text)."""
    scrubbed = []
    for call in calls:
        function = call["function"]
        arguments = function["arguments"]
        if isinstance(arguments, str):
            try:
                arguments = orjson.dumps(_scrub_json(orjson.loads(arguments), counts)).decode()
            except orjson.JSONDecodeError:
                arguments = _scrub_text(arguments, counts)
        else:
            arguments = _scrub_json(arguments, counts)
        scrubbed.append({**call, "function": {**function, "arguments": arguments}})
    return scrubbed


def scrub_messages(messages: Iterable[Message], counts: Counter[str]) -> list[Message]:
    scrubbed = []
    for m in messages:
        text, found = _scrubbed(m["content"])
        for kind, n in found:
            counts[kind] += n
        message = {"role": m["role"], "content": text}
        if len(m) > 2:  # a tool-calling turn: its calls (arguments scrubbed too) and tool_call_id stay
            message.update((key, value) for key, value in m.items() if key not in message)
            if m.get("tool_calls"):
                message["tool_calls"] = _scrub_calls(m["tool_calls"], counts)
        scrubbed.append(message)
    return scrubbed


def scrub_pair(pair: PairRecord) -> Counter[str]:
    """Scrub a pair's prompt, chosen and rejected texts in place; return what was masked."""
    counts: Counter[str] = Counter()
    pair["prompt"] = scrub_messages(pair["prompt"], counts)
    pair["chosen"] = scrub_messages(pair["chosen"], counts)
    pair["rejected"] = scrub_messages(pair["rejected"], counts)
    return counts
