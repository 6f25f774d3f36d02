"""Signed messages between the scheduler and remote executors.

Agents and Kubernetes Jobs have no database credentials: they reach the
scheduler only through the broker, and anyone who can publish to the broker
could forge a report ("apply succeeded") or a hand-off ("run this
configuration"). Every such message is an envelope signed with HMAC-SHA256
over its whole body, with a key derived from the pool's token:

* ``derive(token, "handoff")`` signs hand-offs to a pool's agents, so an
  agent runs only what the scheduler sent;
* ``derive(token, "agent")`` signs agents' beats (who they are, what they run);
* ``run_key(token, task, fence)`` signs one claim's reports and their
  replies. A Kubernetes Job is given only this key, so a compromised pod can
  speak for its own phase and nothing else.

Keys are separated by purpose, so a signature made for one kind of message
is never valid as another. This module imports nothing from the scheduler:
agents use it without a database.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

#: A body larger than this is refused before it is parsed or verified.
MAX_ENVELOPE_BYTES = 256 * 1024 * 1024


class BadSignature(Exception):
    """The envelope is malformed, unsigned, or signed with another key."""


def derive(token: str | bytes, purpose: str) -> bytes:
    """The key for ``purpose`` under a pool's ``token``."""
    root = token.encode() if isinstance(token, str) else token
    return hmac.new(root, purpose.encode(), hashlib.sha256).digest()


def run_key(token: str | bytes, task_id: int, fence: int) -> bytes:
    """The key that signs the reports of ``task_id``'s claim ``fence``."""
    return derive(token, f"run:{task_id}:{fence}")


def sign(key: bytes, body: str) -> str:
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def seal(key: bytes, pool: str, body: dict[str, Any]) -> dict[str, str]:
    """An envelope carrying ``body``, signed with ``key``, for ``pool``."""
    text = json.dumps(body, separators=(",", ":"), sort_keys=True)
    return {"pool": pool, "body": text, "sig": sign(key, text)}


def parse(envelope: object) -> tuple[str, str, str]:
    """``(pool, body, sig)`` of a well-formed envelope, unverified."""
    if not isinstance(envelope, dict):
        raise BadSignature(f"not an envelope: {type(envelope).__name__}")
    pool, body, sig = envelope.get("pool"), envelope.get("body"), envelope.get("sig")
    if not isinstance(pool, str) or not isinstance(body, str):
        raise BadSignature("envelope lacks its pool or body")
    if not isinstance(sig, str) or not sig:
        raise BadSignature("envelope is unsigned")
    if len(body) > MAX_ENVELOPE_BYTES:
        raise BadSignature(f"envelope body is {len(body)} bytes, over the limit")
    return pool, body, sig


def body_of(envelope: object) -> dict[str, Any]:
    """The body of ``envelope``, unverified: only to learn which key checks it."""
    _, body, _ = parse(envelope)
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise BadSignature(f"envelope body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadSignature("envelope body is not an object")
    return doc


def open_(key: bytes, envelope: object) -> dict[str, Any]:
    """The body of ``envelope`` if ``key`` signed it; else :class:`BadSignature`."""
    _, body, sig = parse(envelope)
    # Constant time: a byte-by-byte compare would leak the signature's prefix.
    if not hmac.compare_digest(sign(key, body), sig):
        raise BadSignature("bad signature")
    return body_of(envelope)
