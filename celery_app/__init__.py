"""runq's Celery application: ``celery -A celery_app worker`` / ``beat``."""

from celery_app.app import app

__all__ = ["app"]
