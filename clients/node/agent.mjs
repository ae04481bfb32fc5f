#!/usr/bin/env node
// A Tessera agent in Node.js, from proto/ alone (docs/agents-any-language.md is the
// protocol): it gets its workload certificate from OpenBao/Vault with its AppRole,
// serves AgentService over mTLS (only the coordinator may hand it a task), registers
// and heartbeats through RegistryService, and calls a tool through the tool proxy
// with each task's token. It offers `support.technical`, the contract the Python
// `technical` reference agent offers, so either can serve a support workflow.
//
//   npm ci && npm run generate
//   TESSERA_VAULT_ADDR=http://127.0.0.1:8200 \
//   TESSERA_VAULT_APPROLE_FILE=.tessera/secrets/agent-technical.approle.json \
//   TESSERA_REGISTRY_ADDRESS=127.0.0.1:50058 node agent.mjs
//
// Prints one JSON line per event it is worth knowing about ({"registered": ...}).

import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import http2 from "node:http2";

import { create, fromJson, toJson } from "@bufbuild/protobuf";
import { DurationSchema, ValueSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { connectNodeAdapter, createGrpcTransport } from "@connectrpc/connect-node";

import { AgentDescriptorSchema, AgentService } from "./gen/tessera/v1/agent_pb.js";
import { SideEffectClass } from "./gen/tessera/v1/common_pb.js";
import { RegistryService } from "./gen/tessera/v1/registry_pb.js";
import { ToolProxyService } from "./gen/tessera/v1/tool_proxy_pb.js";

const env = process.env;
const NAME = env.TESSERA_AGENT_NAME ?? "technical";
const TD = env.TESSERA_TRUST_DOMAIN ?? "tessera.local";
const VAULT = env.TESSERA_VAULT_ADDR ?? "http://127.0.0.1:8200";
const INSTANCE = `node-${randomBytes(6).toString("hex")}`;
const COORDINATOR = `spiffe://${TD}/service/coordinator`;
const emit = (record) => process.stdout.write(`${JSON.stringify(record)}\n`);

// -- identity (docs: §2) ------------------------------------------------------------
async function vault(path, body, token) {
  const res = await fetch(`${VAULT}/v1/${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(token ? { "x-vault-token": token } : {}) },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  if (!res.ok) throw new Error(`vault ${path}: HTTP ${res.status}`);
  return res.json();
}

async function issueCertificate() {
  const approle = JSON.parse(readFileSync(env.TESSERA_VAULT_APPROLE_FILE, "utf8"));
  const { auth } = await vault("auth/approle/login", approle);
  const { data } = await vault(`mesh-pki/issue/agent-${NAME}`, {
    common_name: `${NAME}.agent.${TD}`,
    uri_sans: `spiffe://${TD}/agent/${NAME}`,
    ttl: `${env.TESSERA_CERT_TTL_S ?? 3600}s`,
    format: "pem",
    private_key_format: "pkcs8",
  }, auth.client_token);
  const ca = (data.ca_chain ?? [data.issuing_ca]).join("\n");
  return { cert: data.certificate, key: data.private_key, ca, expiration: data.expiration };
}

// A client of a mesh service, verifying its DNS name (the address is an IP:port).
function meshClient(service, address, peerName, tls) {
  const transport = createGrpcTransport({
    baseUrl: `https://${address}`,
    nodeOptions: { ...tls, servername: `${peerName}.service.${TD}` },
  });
  return createClient(service, transport);
}

// -- the capability (the Python agent's support.technical) ---------------------------
const CONTRACT = {
  name: "support.technical",
  version: "1.0.0",
  description: "Match the ticket against known issues and note the fix (Node.js).",
  reads: ["ticket", "category"],
  writes: ["technical_notes"],
  tools: ["kb.search"],
  sideEffectClass: SideEffectClass.READ_ONLY,
  timeout: create(DurationSchema, { seconds: 10n }),
  maxConcurrency: 32,
};

async function technical(request, tools) {
  const ticket = request.blackboard.ticket ? toJson(ValueSchema, request.blackboard.ticket) : {};
  const text = String(ticket.text ?? "");
  const ctx = request.context;
  const found = await tools.invokeTool(
    {
      context: { workflowId: ctx.workflowId, taskId: ctx.taskId },
      tool: "kb.search",
      arguments: { query: text.slice(0, 500) || "help", top_k: 1 },
      // One search per task, whatever the attempt: a retried attempt replays it.
      idempotencyKey: `${ctx.taskId}:kb.search`,
    },
    { headers: { "x-tessera-task-token": request.taskToken }, timeoutMs: 10_000 },
  );
  const hit = found.result?.hits?.[0];
  const notes = `ticket ${ticket.id ?? "?"}: collect logs${hit ? ` (see ${hit.id})` : ""} [node agent]`;
  return {
    output: { kind: { case: "json", value: { technical_notes: notes } } },
    blackboardWrites: { technical_notes: fromJson(ValueSchema, notes) },
    usage: { tokens: BigInt(Math.floor(text.length / 4)), toolCalls: 1 },
    confidence: 0.8,
    hasConfidence: true,
    summary: notes,
    instanceId: INSTANCE,
  };
}

// -- serving AgentService (docs: §4) ---------------------------------------------------
const answered = new Map(); // (workflow, task, attempt) -> the first successful answer
const MAX_ANSWERED = 10_000; // a retry comes within minutes: older answers are dropped

function routes(tools) {
  return (router) =>
    router.service(AgentService, {
      describe: () => ({ agent: descriptor() }),
      async executeTask(request) {
        if (request.capability !== CONTRACT.name) {
          throw new ConnectError(`no capability ${request.capability}`, Code.InvalidArgument);
        }
        const key = `${request.context.workflowId}/${request.context.taskId}/${request.attempt}`;
        if (!answered.has(key)) {
          const attempt = technical(request, tools(request.toolProxyEndpoint));
          answered.set(key, attempt);
          if (answered.size > MAX_ANSWERED) answered.delete(answered.keys().next().value);
          attempt.catch(() => answered.delete(key)); // only successes are replayed
        }
        return answered.get(key);
      },
    });
}

// Only the coordinator may call ExecuteTask (it carries a live task token), checked on
// the caller's verified certificate before the handler runs.
function callerAllowed(req) {
  const san = req.socket.getPeerCertificate()?.subjectaltname ?? "";
  const uris = san.split(", ").filter((s) => s.startsWith("URI:")).map((s) => s.slice(4));
  if (uris.length !== 1) return false;
  if (req.url === "/tessera.v1.AgentService/ExecuteTask") return uris[0] === COORDINATOR;
  return uris[0] === COORDINATOR || uris[0] === `spiffe://${TD}/service/operator`;
}

let endpoint = "";
const descriptor = () =>
  create(AgentDescriptorSchema, {
    name: NAME,
    version: "1.0.0-node",
    instanceId: INSTANCE,
    endpoint,
    capabilities: [CONTRACT],
  });

// -- main ------------------------------------------------------------------------------
let tls = await issueCertificate();
// Clients of the registry and of each tool proxy a task names, on the current certificate.
const clients = () => ({
  registry: meshClient(RegistryService, env.TESSERA_REGISTRY_ADDRESS ?? "127.0.0.1:50058", "registry", tls),
  proxies: new Map(),
});
let mesh = clients();
function toolProxy(address) {
  if (!mesh.proxies.has(address)) mesh.proxies.set(address, meshClient(ToolProxyService, address, "tool-proxy", tls));
  return mesh.proxies.get(address);
}
const adapter = connectNodeAdapter({ routes: routes(toolProxy) });
const server = http2.createSecureServer(
  { ...tls, requestCert: true, rejectUnauthorized: true, allowHTTP1: false },
  (req, res) => {
    if (callerAllowed(req)) return adapter(req, res);
    res.writeHead(200, { "content-type": "application/grpc", "grpc-status": "7", "grpc-message": "caller not allowed" });
    return res.end();
  },
);
await new Promise((resolve) => server.listen(Number(env.TESSERA_AGENT_PORT ?? 0), "127.0.0.1", resolve));
endpoint = `127.0.0.1:${server.address().port}`;

// Renew at two thirds of the certificate's life: new handshakes get the new one.
(function renewLater() {
  const lifeMs = tls.expiration * 1000 - Date.now();
  setTimeout(async () => {
    try {
      tls = await issueCertificate();
      server.setSecureContext(tls);
      mesh = clients();
    } catch (error) {
      emit({ renewal_failed: String(error) });
    }
    renewLater();
  }, Math.max(1_000, (lifeMs * 2) / 3)).unref();
})();

let beat;
async function heartbeat() {
  try {
    const answer = await mesh.registry.register({ agent: descriptor() }, { timeoutMs: 5_000 });
    if (!beat) emit({ registered: NAME, instance_id: INSTANCE, endpoint });
    const everyMs = Number(answer.heartbeatInterval?.seconds ?? 5n) * 1000;
    beat = setTimeout(heartbeat, Math.max(500, everyMs));
  } catch (error) {
    emit({ register_failed: String(error) }); // try again at the next beat
    beat = setTimeout(heartbeat, 1_000);
  }
}
await heartbeat();

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.once(signal, async () => {
    clearTimeout(beat);
    await mesh.registry.deregister({ name: NAME, instanceId: INSTANCE }, { timeoutMs: 5_000 }).catch(() => {});
    // Answer stragglers for a second, then stop taking calls; the coordinator keeps its
    // HTTP/2 connection open, so running calls get five more seconds, not forever.
    setTimeout(() => {
      server.close(() => process.exit(0));
      setTimeout(() => process.exit(0), 5_000).unref();
    }, 1_000);
  });
}
