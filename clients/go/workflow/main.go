// Command workflow is the Go twin of clients/node/workflow.mjs: it starts the `loan`
// reference workflow through the Envoy gateway, watches it until it parks on a human
// gate, approves the gate, and watches it to completion, printing one JSON object per
// line. It exits 0 only when the workflow SUCCEEDED.
//
//	clients/go/build.sh                       # generate + build offline (Debian packages)
//	.build/go/workflow 127.0.0.1:8080
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"

	tesserav1 "github.com/tessera-mesh/tessera/gen/go/tessera/v1"
)

// Identity tokens (`tessera login`): the requester starts the loan, a compliance officer
// decides its AML gate (nobody may decide a gate of their own workflow).
func bearer(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

func emit(v interface{}) {
	line, _ := json.Marshal(v)
	fmt.Println(string(line))
}

func run(ctx context.Context, gateway string) (tesserav1.WorkflowState, error) {
	conn, err := grpc.DialContext(ctx, gateway, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		return 0, fmt.Errorf("dial %s: %w", gateway, err)
	}
	defer conn.Close()
	coordinator := tesserav1.NewCoordinatorServiceClient(conn)
	approverToken := os.Getenv("TESSERA_APPROVER_TOKEN")
	if approverToken == "" {
		approverToken = os.Getenv("TESSERA_TOKEN")
	}
	approverCtx := bearer(ctx, approverToken)
	ctx = bearer(ctx, os.Getenv("TESSERA_TOKEN"))

	inputs, err := structpb.NewStruct(map[string]interface{}{
		"application": map[string]interface{}{"applicant": "ACME", "amount": 250000, "country": "XX"},
	})
	if err != nil {
		return 0, err
	}
	started, err := coordinator.StartWorkflow(ctx, &tesserav1.StartWorkflowRequest{
		RequestId: fmt.Sprintf("go-%d", time.Now().UnixNano()), // idempotency key
		Goal:      "loan",
		Inputs:    inputs,
	})
	if err != nil {
		return 0, err
	}
	name := started.GetWorkflow().GetName()
	emit(map[string]string{"started": name, "state": started.GetWorkflow().GetState().String()})

	next := int64(1)
	for ended := false; !ended; {
		stream, err := coordinator.WatchWorkflow(ctx, &tesserav1.WatchWorkflowRequest{Name: name, StartSequence: next})
		if err != nil {
			return 0, err
		}
		for {
			reply, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return 0, err
			}
			event := reply.GetEvent()
			raw, _ := protojson.Marshal(event)
			emit(map[string]json.RawMessage{"event": raw})
			next = event.GetSequence() + 1
			if gate := event.GetGateOpened(); gate != nil {
				decided, err := coordinator.DecideGate(approverCtx, &tesserav1.DecideGateRequest{
					Name:     name + "/gates/" + gate.GetGateId(),
					Decision: tesserav1.GateDecision_GATE_DECISION_APPROVE,
					Comment:  "approved by the Go example client",
				})
				if err != nil {
					return 0, err
				}
				emit(map[string]string{
					"decided":   decided.GetGate().GetName(),
					"decision":  "APPROVE",
					"decidedBy": decided.GetGate().GetDecidedBy(),
				})
			}
			if event.GetWorkflowCompleted() != nil || event.GetWorkflowFailed() != nil || event.GetWorkflowCancelled() != nil {
				ended = true
				break
			}
		}
	}
	final, err := coordinator.GetWorkflow(ctx, &tesserav1.GetWorkflowRequest{Name: name})
	if err != nil {
		return 0, err
	}
	emit(map[string]string{"workflow": name, "state": final.GetWorkflow().GetState().String()})
	return final.GetWorkflow().GetState(), nil
}

func main() {
	gateway := os.Getenv("TESSERA_GATEWAY")
	if len(os.Args) > 1 {
		gateway = os.Args[1]
	}
	if gateway == "" {
		gateway = "127.0.0.1:8080"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	state, err := run(ctx, gateway)
	if err != nil {
		emit(map[string]string{"error": err.Error()})
		os.Exit(2)
	}
	if state != tesserav1.WorkflowState_WORKFLOW_STATE_SUCCEEDED {
		os.Exit(1)
	}
}
