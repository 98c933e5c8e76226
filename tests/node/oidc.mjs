// Starts oidc-provider (a certified OpenID Connect / OAuth 2 server, from npm) for the tests:
//   node oidc.mjs PORT            (env OIDC_ACCESS_TTL: seconds an access token for a resource lives, default 600)
// Clients:
//   mcp-client       / mcp-client-secret        client_credentials; scopes mcp:tools mcp:read mcp:admin
//   gateway          / gateway-secret           no grant: it only introspects
//   gateway-upstream / gateway-upstream-secret  client_credentials and RFC 8693 token exchange (below)
//   mcp-desktop      (public, native)           authorization_code + refresh_token; redirect
//                                               http://127.0.0.1/callback, any loopback port (RFC 8252 7.3)
//   and any client that registers itself at /reg (RFC 7591, open registration).
// Authorization code: PKCE S256 required for every client; the redirect carries `iss` (RFC 9207); refresh
// tokens issued without offline_access and rotated on every use (reusing a rotated one revokes the grant).
// Resource indicators (RFC 8707): any http://127.0.0.1:* resource gets opaque access tokens whose audience is
// that resource, in every grant. Introspection (RFC 7662, only `gateway` may) at /token/introspection;
// revocation (RFC 7009) at /token/revocation.
// Interactions, driven over HTTP by tests/oidc_browser.py (no human):
//   GET  /interaction/UID          JSON: the prompt (login or consent) and what it asks for
//   POST /interaction/UID/login    form login=SUBJECT: logs in as SUBJECT
//   POST /interaction/UID/consent  grants what was asked (scopes, and each resource's scopes)
//   each POST answers 303 to where the authorization continues.
// Token exchange: grant_type urn:ietf:params:oauth:grant-type:token-exchange with subject_token (an access
// token this server issued, still valid), subject_token_type ...:access_token, resource (required) and
// optionally scope (within the subject's): a new opaque access token for the same account, the exchanging
// client, audience = resource.
// Prints `ready <issuer>` once it listens.
import Provider, { errors } from "oidc-provider";

const port = Number(process.argv[2]);
const issuer = `http://127.0.0.1:${port}`;
const loopback = /^http:\/\/127\.0\.0\.1:\d+\//;
const accessTtl = Number(process.env.OIDC_ACCESS_TTL || 600);
if (!Number.isInteger(accessTtl) || accessTtl <= 0) throw new Error("OIDC_ACCESS_TTL must be a positive integer");

const SCOPES = "mcp:tools mcp:read mcp:admin";
const TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token";

function resourceServer(resource) {
  if (!loopback.test(resource)) throw new errors.InvalidTarget(`unknown resource ${resource}`);
  return { scope: SCOPES, audience: resource, accessTokenFormat: "opaque", accessTokenTTL: accessTtl };
}

const provider = new Provider(issuer, {
  clients: [
    { client_id: "mcp-client", client_secret: "mcp-client-secret", grant_types: ["client_credentials"],
      response_types: [], redirect_uris: [], scope: SCOPES },
    { client_id: "gateway", client_secret: "gateway-secret", grant_types: [], response_types: [], redirect_uris: [] },
    { client_id: "gateway-upstream", client_secret: "gateway-upstream-secret",
      grant_types: ["client_credentials", TOKEN_EXCHANGE], response_types: [], redirect_uris: [], scope: SCOPES },
    { client_id: "mcp-desktop", application_type: "native", token_endpoint_auth_method: "none",
      grant_types: ["authorization_code", "refresh_token"], response_types: ["code"],
      redirect_uris: ["http://127.0.0.1/callback"], scope: SCOPES },
  ],
  scopes: SCOPES.split(" "),
  responseTypes: ["code", "none"],
  findAccount: async (_ctx, id) => ({ accountId: id, claims: async () => ({ sub: id }) }),
  ttl: {
    AccessToken: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? 3600,
    ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? 600,
  },
  pkce: { required: () => true },
  issueRefreshToken: async (_ctx, client, code) =>
    code.kind === "AuthorizationCode" && client.grantTypeAllowed("refresh_token"),
  rotateRefreshToken: true,
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    registration: { enabled: true, initialAccessToken: false },
    // only the gateway may introspect, as a real deployment would configure it
    introspection: { enabled: true, allowedPolicy: (ctx) => ctx.oidc.client.clientId === "gateway" },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (_ctx, _client, oneOf) => oneOf,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resource) => resourceServer(resource),
    },
  },
});
provider.proxy = false;

async function form(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Object.fromEntries(new URLSearchParams(Buffer.concat(chunks).toString("utf8")));
}

function refuse(ctx, status, error) {
  ctx.status = status;
  ctx.body = { error };
}

// The login and consent pages, as JSON and form posts a test's HTTP client can drive.
provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([^/]+)(?:\/(login|consent))?$/.exec(ctx.path);
  if (!match) return next();
  const [, uid, action] = match;
  if (ctx.method !== (action ? "POST" : "GET")) return refuse(ctx, 405, "method not allowed");
  let details;
  try {
    details = await provider.interactionDetails(ctx.req, ctx.res);
  } catch (err) {
    return refuse(ctx, 400, `no interaction in progress: ${err.message}`);
  }
  if (details.uid !== uid) return refuse(ctx, 400, "this is not the interaction in progress");
  const { name: prompt, reasons, details: asked } = details.prompt;
  if (!action) {
    ctx.body = { uid, prompt, reasons, params: details.params, client_id: details.params.client_id,
                 account: details.session?.accountId, ...asked };
    return;
  }
  if (action !== prompt) return refuse(ctx, 400, `the prompt is ${prompt}, not ${action}`);
  let result;
  if (action === "login") {
    const { login } = await form(ctx.req);
    if (!login) return refuse(ctx, 400, "login (the subject) is required");
    result = { login: { accountId: login } };
  } else {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
    if (asked.missingOIDCScope) grant.addOIDCScope(asked.missingOIDCScope.join(" "));
    if (asked.missingOIDCClaims) grant.addOIDCClaims(asked.missingOIDCClaims);
    for (const [resource, scopes] of Object.entries(asked.missingResourceScopes || {})) {
      grant.addResourceScope(resource, scopes.join(" "));
    }
    result = { consent: { grantId: await grant.save() } };
  }
  const next_ = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: false });
  ctx.status = 303;
  ctx.redirect(next_);
});

// RFC 8693 token exchange: the subject's account, the exchanging client, the named resource as audience.
provider.registerGrantType(TOKEN_EXCHANGE, async (ctx) => {
  const { params, client } = ctx.oidc;
  if (params.subject_token_type !== ACCESS_TOKEN_TYPE) {
    throw new errors.InvalidRequest(`subject_token_type must be ${ACCESS_TOKEN_TYPE}`);
  }
  if (params.requested_token_type && params.requested_token_type !== ACCESS_TOKEN_TYPE) {
    throw new errors.InvalidRequest(`requested_token_type must be ${ACCESS_TOKEN_TYPE}`);
  }
  if (Array.isArray(params.resource)) throw new errors.InvalidRequest("one resource only");
  if (!params.resource) throw new errors.InvalidTarget("resource is required");
  const info = resourceServer(params.resource);
  const subject = params.subject_token && await provider.AccessToken.find(params.subject_token);
  if (!subject || subject.isExpired || !subject.accountId) {
    throw new errors.InvalidGrant("subject_token is not a valid access token");
  }
  if (subject.grantId && !(await provider.Grant.find(subject.grantId))) {
    throw new errors.InvalidGrant("the subject token's grant has ended");
  }
  const held = new Set((subject.scope || "").split(" ").filter(Boolean));
  const wanted = params.scope ? params.scope.split(" ").filter(Boolean) : [...held];
  if (wanted.some((scope) => !held.has(scope))) {
    throw new errors.InvalidScope("scope exceeds the subject token's", params.scope);
  }
  // no grantId: a grant belongs to the client it was given to, and this token is the exchanging client's
  const token = new provider.AccessToken({
    accountId: subject.accountId, client, gty: "token_exchange", scope: wanted.join(" ") || undefined,
  });
  token.resourceServer = new provider.ResourceServer(params.resource, info);
  const value = await token.save();
  ctx.body = { access_token: value, issued_token_type: ACCESS_TOKEN_TYPE, token_type: "Bearer",
               expires_in: token.expiration, scope: token.scope };
}, ["subject_token", "subject_token_type", "requested_token_type", "resource", "scope"], ["resource"]);

const server = provider.listen(port, "127.0.0.1", () => console.log(`ready ${issuer}`));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
