"""``make bench-quick``: runq against its legacy mode and bare Celery (issue 7)."""
