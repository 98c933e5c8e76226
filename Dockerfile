# mcp-security-gateway as a container: `docker run -v $PWD/gateway.yaml:/etc/mcp-gateway/gateway.yaml ...`
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY policies ./policies
RUN pip install --no-cache-dir . && useradd --system --home /var/lib/mcp-gateway --create-home gateway
USER gateway
WORKDIR /var/lib/mcp-gateway
EXPOSE 8080
ENTRYPOINT ["mcp-gateway"]
CMD ["serve", "--config", "/etc/mcp-gateway/gateway.yaml", "--host", "0.0.0.0"]
