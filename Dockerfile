# One image for all four services: a container's command picks what it runs
# (`serve --service consent --port 50051`, `migrate`, `health`, ...).

# Build stage: install steward and its dependencies into a virtual environment that the
# runtime stage copies whole, so the final image carries no build tools or pip cache.
FROM python:3.11-slim AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/steward
ENV PATH=/opt/steward/bin:$PATH

WORKDIR /src
# pyproject.toml names README.md as the long description; services/ holds every package
# (the generated proto code included) and the Alembic migrations.
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install --upgrade pip \
 && pip install . \
 && steward --help > /dev/null

# Runtime stage.
FROM python:3.11-slim

# A fixed uid/gid, so secrets mounted from the host can be owned by it (see README, Deployment).
RUN groupadd --system --gid 10001 steward \
 && useradd --system --uid 10001 --gid steward --home-dir /var/lib/steward --create-home \
        --shell /usr/sbin/nologin steward

COPY --from=build /opt/steward /opt/steward

ENV PATH=/opt/steward/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STEWARD_HOST=0.0.0.0 \
    STEWARD_PORT=50051 \
    STEWARD_DATA_DIR=/var/lib/steward/data \
    STEWARD_LOG_FORMAT=json

USER 10001:10001
WORKDIR /var/lib/steward

EXPOSE 50051

# grpc.health.v1 of every service the container hosts, through the same client operators use.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["steward", "health", "--target", "localhost:50051", "--timeout", "3"]

ENTRYPOINT ["steward"]
# All four services in one process; compose runs one service per container instead.
CMD ["serve"]
