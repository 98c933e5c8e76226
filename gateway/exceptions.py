"""The root of every exception the gateway defines, and the whole family drawn in one place.

`except GatewayError` catches every error of the package's own and nothing
else: a bug in the gateway, or a library's error that escaped, still surfaces
as what it is. Each class lives beside the code that raises it; this module
imports nothing from the package, so every module may import it.

* GatewayError
  + GatewayRefusal ............ errors: refuse the request being handled (a row of the catalogue)
  | + AuthFailed .............. auth.authenticator: 401, with the WWW-Authenticate challenge
  | + StateUnavailable ........ errors: the shared state store cannot be reached (503)
  + ProblemsError ............. yamlfile: something a person must fix in a file, one line per problem
  | + YamlFileError ........... yamlfile: a YAML file cannot be read or parsed
  | + ConfigError ............. config: the config file is invalid
  | + PolicyError ............. policy.model: the policy file is invalid
  | + ChainKeyError ........... audit.chainkey: the audit chain key file is missing or unusable
  + NotJson ................... jsonrpc: a body that is not JSON (also a ValueError)
  + NotJsonRpc ................ jsonrpc: JSON, but no JSON-RPC 2.0 message or batch (also a ValueError)
  + MalformedParams ........... mcp: a known method whose target cannot be read (also a ValueError)
  + InvalidUri ................ policy.uri: a resource URI with no safe canonical form (also a ValueError)
  + ClaimTypeError ............ principal: a token claim of the wrong JSON type (also a ValueError)
  + SigningKeyError ........... auth.keys: the gateway's signing key file is missing or unusable (also a ValueError)
  + IntrospectionUnavailable .. auth.introspection: the introspection endpoint gave no usable answer
  + AuditUnavailable .......... audit.writer: the audit queue is full, or events were not written in time
  + AnswerWithheld ............ inspect: an answer begun that cannot end as it should (its events not written, or
  |                               judged only once streamed and found unfit to pass): its end is never sent
  + InvalidJson ............... json_scan: a streamed answer that is not one strict JSON object (also a ValueError)
  + BadQuery .................. audit.reading: an audit query parameter that cannot be understood (also a ValueError)
  + SinkUnreadable ............ audit.sinks: an audit sink cannot be read back (not there yet, unreachable)
  + EventTooLarge ............. sse: one SSE event grew past the decoder's bound (also a ValueError)
  + UpstreamError ............. upstream_http: the upstream cannot be reached or broke HTTP/1.1
  + Broken .................... stdio.channel: a stdio upstream's process cannot serve (exited, protocol, timeout)
  + PoolFull .................. stdio.pool: every process slot of a stdio upstream is taken
  + LineTooLong ............... stdio.process: a child wrote a line over the bound
  + ChildGone ................. stdio.process: a child's stdin is closed
  + OAuthClientError .......... oauth.metadata: the gateway's own OAuth flow (connect, an upstream's token) cannot go on
  | + TokenRefused ............ oauth.client: the token endpoint answered with an OAuth error (e.g. invalid_grant)
  + TokenStoreError ........... oauth.store: the token store of `connect` cannot be used as it is
  + ListingFailed ............. upstream_tools: an upstream could not be asked for its tools
  + _OAuthError ............... auth.server: an OAuth error answer (private)
  + _Violation ................ upstream_http: an answer breaking a rule of the client (private)
  + _Unreadable ............... inspect: an upstream answer (or an event of one) that cannot be inspected (private)

`ValueError` is a second base for the errors that say a value is bad, so that
callers who catch a bad value as one keep working: a pydantic validator
(ClaimTypeError in the config's client claims), `policy explain` reading a case
(MalformedParams, ClaimTypeError), and code outside the package.
"""


class GatewayError(Exception):
    """An error the gateway itself defines; see the module docstring for the family."""
