"""executors.local.summarize_plan on ``terraform show -json`` shaped plans."""

from __future__ import annotations

from typing import Any

import pytest

from executors.base import Changes
from executors.local import summarize_plan


def rc(address: str, *actions: str) -> dict[str, Any]:
    return {
        "address": address,
        "mode": "managed",
        "type": "null_resource",
        "name": address.rsplit(".", maxsplit=1)[-1],
        "change": {"actions": list(actions), "before": None, "after": {}},
    }


def plan(*changes: dict[str, Any], **extra: Any) -> dict[str, object]:
    return {
        "format_version": "0.2",
        "terraform_version": "1.0.3",
        "resource_changes": list(changes),
        **extra,
    }


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"format_version": "0.2"}, Changes()),
        ({"resource_changes": None}, Changes()),
        (plan(), Changes()),
        (plan(rc("a", "no-op"), rc("b", "read")), Changes()),
        (plan(rc("a", "create")), Changes(add=1)),
        (plan(rc("a", "update")), Changes(change=1)),
        (plan(rc("a", "delete")), Changes(destroy=1)),
        # replace: destroy-before-create and create-before-destroy alike
        (plan(rc("a", "delete", "create")), Changes(add=1, destroy=1)),
        (plan(rc("a", "create", "delete")), Changes(add=1, destroy=1)),
        (
            plan(
                rc("a", "create"),
                rc("b", "create"),
                rc("c", "update"),
                rc("d", "delete"),
                rc("e", "delete", "create"),
                rc("f", "no-op"),
                rc("g", "read"),
            ),
            Changes(add=3, change=1, destroy=2),
        ),
        # outputs-only changes move no resource
        (
            plan(rc("a", "no-op"), output_changes={"x": {"actions": ["create"]}}),
            Changes(),
        ),
    ],
)
def test_summarize_plan(doc: dict[str, object], expected: Changes) -> None:
    assert summarize_plan(doc) == expected


def test_resource_change_without_actions_counts_nothing() -> None:
    assert summarize_plan({"resource_changes": [{"address": "a"}, {"change": {}}]}) == Changes()
