#!/usr/bin/env node
// Tessera from Node.js: start the `loan` reference workflow through the Envoy gateway,
// watch it (server stream) until it parks on a human gate, approve the gate, and watch
// it to completion. Prints one JSON object per line; exits 0 only when the workflow
// SUCCEEDED.
//
//   make proto-deps                     # once, at the repo root (google/api, google/rpc for buf)
//   npm ci && npm run generate          # local protoc-gen-es -> gen/
//   node workflow.mjs 127.0.0.1:8080    # or TESSERA_GATEWAY=host:port node workflow.mjs
//
// The code in gen/ is generated from proto/ by buf with the local protoc-gen-es plugin
// (clients/node/buf.gen.yaml); the gRPC transport is @connectrpc/connect-node, speaking
// gRPC over HTTP/2 cleartext, which is what Envoy serves on the gateway port.

import { randomUUID } from "node:crypto";

import { createRegistry, toJson } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import {
  CoordinatorService,
  GateDecision,
  GateState,
  WorkflowSchema,
  WorkflowState,
} from "./gen/tessera/v1/coordinator_pb.js";
import { file_tessera_v1_common } from "./gen/tessera/v1/common_pb.js";
import { file_tessera_v1_events, WorkflowEventSchema } from "./gen/tessera/v1/events_pb.js";
import { file_tessera_v1_planner } from "./gen/tessera/v1/planner_pb.js";

const gateway = process.argv[2] ?? process.env.TESSERA_GATEWAY ?? "127.0.0.1:8080";
const overallTimeoutMs = Number(process.env.TESSERA_TIMEOUT_MS ?? 60_000);
// Identity tokens (`tessera login`): the requester starts the loan, a compliance
// officer decides its AML gate (nobody may decide a gate of their own workflow).
const token = process.env.TESSERA_TOKEN ?? "";
const approverToken = process.env.TESSERA_APPROVER_TOKEN ?? token;

// Lets toJson print google.protobuf.Any payloads of our own types.
const registry = createRegistry(file_tessera_v1_common, file_tessera_v1_planner, file_tessera_v1_events);

function clientFor(bearer) {
  const transport = createGrpcTransport({
    baseUrl: gateway.includes("://") ? gateway : `http://${gateway}`,
    // Envoy verifies the token on every call and speaks for us to the mesh.
    interceptors: [
      (next) => async (req) => {
        req.header.set("authorization", `Bearer ${bearer}`);
        return next(req);
      },
    ],
  });
  return createClient(CoordinatorService, transport);
}
const coordinator = clientFor(token);
const approver = clientFor(approverToken);

function emit(record) {
  process.stdout.write(JSON.stringify(record) + "\n");
}

function eventJson(event) {
  try {
    return toJson(WorkflowEventSchema, event, { registry });
  } catch (error) {
    // An Any of a type we do not know: still show what happened.
    return { sequence: String(event.sequence), kind: event.kind.case, note: String(error) };
  }
}

const TERMINAL = new Set(["workflowCompleted", "workflowFailed", "workflowCancelled"]);

async function main() {
  const deadline = AbortSignal.timeout(overallTimeoutMs);

  const started = await coordinator.startWorkflow(
    {
      requestId: `node-${randomUUID()}`, // idempotency key: retrying this call is safe
      goal: "loan",
      inputs: { application: { applicant: "ACME", amount: 250000, country: "XX" } },
    },
    { signal: deadline, timeoutMs: 15_000 },
  );
  const name = started.workflow.name;
  emit({ started: name, state: WorkflowState[started.workflow.state] });

  // Watch, deciding each gate as it opens. A gate ends one watch; the next watch resumes
  // from the following sequence number, so no event is missed or printed twice.
  let next = 1n;
  let ended = null;
  for (let watches = 0; !ended && watches < 20; watches++) {
    let gate = null;
    const stream = coordinator.watchWorkflow({ name, startSequence: next }, { signal: deadline });
    for await (const { event } of stream) {
      if (!event) continue;
      emit({ event: eventJson(event) });
      next = event.sequence + 1n;
      if (event.kind.case === "gateOpened") {
        gate = event.kind.value;
        break; // leaving the loop cancels the stream
      }
      if (TERMINAL.has(event.kind.case)) {
        ended = event.kind.case;
        break;
      }
    }
    if (gate) {
      const reply = await approver.decideGate(
        {
          name: `${name}/gates/${gate.gateId}`,
          decision: GateDecision.APPROVE,
          comment: "approved by the Node.js example client",
        },
        { signal: deadline, timeoutMs: 15_000 },
      );
      emit({
        decided: reply.gate.name,
        decision: "APPROVE",
        decidedBy: reply.gate.decidedBy,
        gateState: GateState[reply.gate.state],
      });
    }
  }

  const final = (await coordinator.getWorkflow({ name }, { signal: deadline, timeoutMs: 15_000 }))
    .workflow;
  const state = WorkflowState[final.state];
  emit({ workflow: name, state: `WORKFLOW_STATE_${state}`, result: toJson(WorkflowSchema, final).result ?? null });
  return final.state === WorkflowState.SUCCEEDED ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (error) => {
    const err = ConnectError.from(error);
    emit({ error: { code: Code[err.code], message: err.rawMessage } });
    process.exit(2);
  },
);
