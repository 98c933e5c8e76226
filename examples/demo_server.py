"""A demo MCP server (the official SDK's `MCPServer`) to put behind the gateway.

It has harmless tools, a dangerous one (`delete_file`), resources under
`file:///srv/docs/`, a prompt, and tools that ask the client for sampling or
elicitation (in the 2026-07-28 era through `inputRequests`, in the legacy era
as requests on the SSE stream). The tests use it as their real upstream.

    python examples/demo_server.py --port 9000 [--stateless] [--json-response]
    python examples/demo_server.py --stdio     (for a stdio upstream: `command:` in the config)
"""

import argparse
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer, Resolve, Sample
from mcp_types import CreateMessageResult, SamplingMessage, TextContent
from pydantic import Field

DOCS = {
    "readme": "The demo docs.",
    "secret/keys": "not for readers",
}


def ask_model(topic: str) -> Sample:
    """Resolver for `ask_llm`: one sampling request to the client's model."""
    prompt = TextContent(type="text", text=f"Say something about {topic}")
    return Sample([SamplingMessage(role="user", content=prompt)], max_tokens=50)


def build_server(**options: Any) -> MCPServer:
    """The demo server; `options` go to `MCPServer` (the tests give an upstream its own OAuth this way)."""
    server = MCPServer("demo", instructions="A demo server behind mcp-security-gateway.", **options)

    @server.tool()
    def search(query: str) -> str:
        """Search the demo docs."""
        hits = [name for name, text in DOCS.items() if query.lower() in text.lower()]
        return f"{len(hits)} hit(s): {', '.join(hits)}"

    @server.tool()
    def get_weather(city: str) -> str:
        """Tell the (made-up) weather."""
        return f"Sunny in {city}"

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    def get_forecast(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})], days: int = 1) -> str:
        """A forecast; `region` is mirrored in the Mcp-Param-Region header (2026-07-28)."""
        return f"{days} day(s) of sun in {region}"

    @server.tool()
    def delete_file(path: str) -> str:
        """Delete a file (a dangerous tool: the demo only pretends)."""
        return f"deleted {path}"

    @server.tool()
    def ask_llm(topic: str, reply: Annotated[CreateMessageResult, Resolve(ask_model)]) -> str:
        """Ask the client's model about a topic (a sampling request)."""
        content = reply.content
        return f"model said: {content.text if isinstance(content, TextContent) else content}"

    @server.resource("file:///srv/docs/{name}")
    def doc(name: str) -> str:
        """A document under /srv/docs."""
        return DOCS.get(name, "")

    @server.resource("file:///srv/docs/readme")
    def readme() -> str:
        """The readme."""
        return DOCS["readme"]

    @server.prompt()
    def summarize(text: str) -> str:
        """Summarise a text."""
        return f"Summarise this: {text}"

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--stateless", action="store_true", help="no legacy sessions")
    parser.add_argument("--json-response", action="store_true", help="JSON instead of SSE answers")
    parser.add_argument("--stdio", action="store_true", help="serve on stdin/stdout instead of HTTP")
    args = parser.parse_args()
    if args.stdio:
        build_server().run("stdio")
        return

    import uvicorn

    app = build_server().streamable_http_app(stateless_http=args.stateless, json_response=args.json_response)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
