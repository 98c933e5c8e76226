// Starts oauth2-mock-server (a real OAuth 2 authorization server, from npm) for the tests:
//   node idp.mjs PORT
// The token endpoint takes a test-only form field through the server's own BeforeTokenSigning hook:
//   claims=<JSON>   merged into the token (a null value removes that claim, e.g. {"exp": null})
// SIGUSR2 adds a new RS256 key (rotation); the keystore then signs with its keys in turn.
import { OAuth2Server, Events } from "oauth2-mock-server";

const port = Number(process.argv[2]);
const server = new OAuth2Server();
await server.issuer.keys.generate("RS256", { kid: "key-1" });
let generation = 1;

server.service.on(Events.BeforeTokenSigning, (token, req) => {
  const body = req.body || {};
  const basic = (req.headers.authorization || "").replace(/^Basic /, "");
  const client = basic ? Buffer.from(basic, "base64").toString().split(":")[0] : body.client_id;
  if (client) {
    token.payload.client_id = client;
    token.payload.sub = token.payload.sub || client;
  }
  if (body.claims) {
    for (const [key, value] of Object.entries(JSON.parse(body.claims))) {
      if (value === null) delete token.payload[key];
      else token.payload[key] = value;
    }
  }
});

process.on("SIGUSR2", async () => {
  generation += 1;
  await server.issuer.keys.generate("RS256", { kid: `key-${generation}` });
});
process.on("SIGTERM", async () => {
  await server.stop();
  process.exit(0);
});

await server.start(port, "127.0.0.1");
server.issuer.url = `http://127.0.0.1:${port}`;  // the address it listens on, not "localhost"
console.log(`ready ${server.issuer.url}`);
