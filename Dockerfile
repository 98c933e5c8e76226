# mcp-security-gateway as a container. Two places matter (README: "Running it in a container"):
#   /etc/mcp-gateway      configuration, read only: gateway.yaml and policy.yaml (the image has defaults; mount
#                         your own directory over it, or single files), keys you provide (a Secret)
#   /var/lib/mcp-gateway  data, the volume: what the gateway creates (signing key, audit chain key, audit.db,
#                         role assignments), 0600 files in a 0700 directory, owned by uid 10001
# It runs as uid 10001 and writes nothing else but temporary files (TMPDIR, /tmp), so the root filesystem can
# be read only. tests/test_container.py runs these steps as a plain install.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MCP_GATEWAY_DATA_DIR=/var/lib/mcp-gateway
WORKDIR /app
# Dependencies and the build backend from the lock, every file checked against its hash; then the gateway itself,
# built with that backend (no isolated build fetching an unpinned one), without resolving anything.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf build
COPY deploy/container/gateway.yaml /etc/mcp-gateway/gateway.yaml
COPY policies/default.yaml /etc/mcp-gateway/policy.yaml
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /var/lib/mcp-gateway gateway \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/mcp-gateway
USER 10001:10001
VOLUME ["/var/lib/mcp-gateway"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["mcp-gateway"]
CMD ["serve", "--config", "/etc/mcp-gateway/gateway.yaml", "--host", "0.0.0.0", "--port", "8080"]
