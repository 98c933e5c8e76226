// Starts oidc-provider (a certified OpenID Connect / OAuth 2 server, from npm) for the tests:
//   node oidc.mjs PORT
// Clients (client_secret_basic or client_secret_post):
//   mcp-client / mcp-client-secret   client_credentials; scopes mcp:tools mcp:read mcp:admin
//   gateway    / gateway-secret      no grant: it only introspects
// Resource indicators (RFC 8707) are on: any http://127.0.0.1:* resource gets opaque access tokens
// whose audience is that resource. Introspection (RFC 7662) is at /token/introspection.
// Prints `ready <issuer>` once it listens.
import Provider from "oidc-provider";

const port = Number(process.argv[2]);
const issuer = `http://127.0.0.1:${port}`;
const loopback = /^http:\/\/127\.0\.0\.1:\d+\//;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: "mcp-client",
      client_secret: "mcp-client-secret",
      grant_types: ["client_credentials"],
      response_types: [],
      redirect_uris: [],
      scope: "mcp:tools mcp:read mcp:admin",
    },
    {
      client_id: "gateway",
      client_secret: "gateway-secret",
      grant_types: [],
      response_types: [],
      redirect_uris: [],
    },
  ],
  scopes: ["mcp:tools", "mcp:read", "mcp:admin"],
  ttl: { ClientCredentials: 600 },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    // only the gateway may introspect, as a real deployment would configure it
    introspection: { enabled: true, allowedPolicy: (ctx) => ctx.oidc.client.clientId === "gateway" },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (_ctx, _client, oneOf) => oneOf,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resource) => {
        if (!loopback.test(resource)) throw new Error(`unknown resource ${resource}`);
        return { scope: "mcp:tools mcp:read mcp:admin", audience: resource, accessTokenFormat: "opaque",
                 accessTokenTTL: 600 };
      },
    },
  },
});
provider.proxy = false;

const server = provider.listen(port, "127.0.0.1", () => console.log(`ready ${issuer}`));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
