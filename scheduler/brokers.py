"""Which broker a URL names, and what runq asks of each.

Redis (the default) and RabbitMQ are supported. Both the Celery apps
(celery_app.config, celery_app.agent) and the plain kombu connections of
remote executors and the report consumer (executors.remote, scheduler.remote)
take their per-broker options from here, so every publisher behaves alike.
"""

from __future__ import annotations

from typing import Any

#: URL schemes of the brokers runq knows (kombu's names for them).
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
REDIS_SCHEMES = frozenset({"redis", "rediss"})


def broker_kind(url: str) -> str:
    """``"redis"``, ``"amqp"``, or the URL's scheme for any other broker."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else url.lower()
    if scheme in AMQP_SCHEMES:
        return "amqp"
    if scheme in REDIS_SCHEMES:
        return "redis"
    return scheme


def transport_options(url: str) -> dict[str, Any]:
    """kombu transport options for a connection to ``url``.

    RabbitMQ: publisher confirms, so a publish returns once the broker has
    taken the message and raises when it did not (a nack, or the channel
    closed under it). Without them a basic.publish is fire-and-forget, and a
    message the broker dropped would look sent; the outbox, the reconciler
    and every executor that reports over the broker rely on a failed send
    raising.
    """
    if broker_kind(url) == "amqp":
        return {"confirm_publish": True}
    return {}
