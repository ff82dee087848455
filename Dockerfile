# syntax=docker/dockerfile:1

# Build stage: wheels for the gateway and its dependencies, the gateway's data plane
# compiled with mypyc (setup.py); this image has the C compiler and the Python headers.
FROM python:3.11-bookworm AS build
WORKDIR /src
RUN pip install --no-cache-dir setuptools==84.2.1 mypy==2.4.1 types-PyYAML==6.0.12.20261122
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
# The dependencies are installed first: mypyc type-checks the compiled modules against them.
# (DL3013 asks for pins: this installs the project's own source tree, with pyproject's.)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-build-isolation '.[speed]' \
    && pip uninstall --yes devicegate \
    && DEVICEGATE_COMPILE=1 pip wheel --no-cache-dir --no-build-isolation --wheel-dir /wheels '.[speed]'

# Runtime stage: no compiler, no sources, a non-root user.
FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin devicegate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels 'devicegate[speed]==0.1.0' \
    && rm -rf /wheels
COPY config.yaml /etc/devicegate/config.yaml
# State kept between runs (the blocked-ids snapshot, a generated admin token): a volume, so
# a restarted container still refuses blocked devices while Redis is unreachable.
RUN mkdir -p /var/lib/devicegate && chown 10001 /var/lib/devicegate && chmod 700 /var/lib/devicegate
VOLUME ["/var/lib/devicegate"]
USER 10001
ENV PYTHONUNBUFFERED=1 GATEWAY_STATE_DIR=/var/lib/devicegate
EXPOSE 8080 8081
# The admin listener (127.0.0.1:8081 by default) answers /healthz without touching Redis.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["gateway"]
CMD ["run", "--config", "/etc/devicegate/config.yaml"]
