// Command agent is a Tessera agent in Go, from proto/ alone (docs/agents-any-language.md
// is the protocol): it gets its workload certificate from OpenBao/Vault with its AppRole,
// serves AgentService over mTLS (only the coordinator may hand it a task), registers and
// heartbeats through RegistryService, and calls a tool through the tool proxy with each
// task's token. It offers `support.technical`, the contract the Python `technical`
// reference agent offers, so either can serve a support workflow.
//
//	clients/go/build.sh       # generate + build offline (Debian packages)
//	TESSERA_VAULT_ADDR=http://127.0.0.1:8200 \
//	TESSERA_VAULT_APPROLE_FILE=.tessera/secrets/agent-technical.approle.json \
//	TESSERA_REGISTRY_ADDRESS=127.0.0.1:50058 .build/go/agent
//
// Prints one JSON line per event worth knowing about ({"registered": ...}).
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"

	tesserav1 "github.com/tessera-mesh/tessera/gen/go/tessera/v1"
)

var (
	name     = envOr("TESSERA_AGENT_NAME", "technical")
	td       = envOr("TESSERA_TRUST_DOMAIN", "tessera.local")
	vault    = envOr("TESSERA_VAULT_ADDR", "http://127.0.0.1:8200")
	instance = "go-" + randomHex(6)
	current  atomic.Value // *tls.Certificate: the latest issued one
)

const maxAnswered = 10000

func envOr(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func emit(v interface{}) {
	line, _ := json.Marshal(v)
	fmt.Println(string(line))
}

// -- identity (docs: §2) ----------------------------------------------------------------

func vaultPost(path, token string, body, out interface{}) error {
	data, _ := json.Marshal(body)
	req, _ := http.NewRequest("POST", vault+"/v1/"+path, bytes.NewReader(data))
	req.Header.Set("content-type", "application/json")
	if token != "" {
		req.Header.Set("x-vault-token", token)
	}
	res, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode != 200 {
		return fmt.Errorf("vault %s: HTTP %d", path, res.StatusCode)
	}
	return json.NewDecoder(res.Body).Decode(out)
}

// issue logs in with the AppRole and issues a certificate: (cert, mesh CA, expiry).
func issue() (*tls.Certificate, *x509.CertPool, time.Time, error) {
	var approle map[string]string
	raw, err := os.ReadFile(os.Getenv("TESSERA_VAULT_APPROLE_FILE"))
	if err == nil {
		err = json.Unmarshal(raw, &approle)
	}
	var login struct {
		Auth struct {
			ClientToken string `json:"client_token"`
		} `json:"auth"`
	}
	if err == nil {
		err = vaultPost("auth/approle/login", "", approle, &login)
	}
	var issued struct {
		Data struct {
			Certificate string   `json:"certificate"`
			PrivateKey  string   `json:"private_key"`
			CAChain     []string `json:"ca_chain"`
			IssuingCA   string   `json:"issuing_ca"`
			Expiration  int64    `json:"expiration"`
		} `json:"data"`
	}
	if err == nil {
		err = vaultPost("mesh-pki/issue/agent-"+name, login.Auth.ClientToken, map[string]interface{}{
			"common_name": name + ".agent." + td,
			"uri_sans":    "spiffe://" + td + "/agent/" + name,
			"ttl":         envOr("TESSERA_CERT_TTL_S", "3600") + "s",
			"format":      "pem", "private_key_format": "pkcs8",
		}, &issued)
	}
	if err != nil {
		return nil, nil, time.Time{}, err
	}
	d := issued.Data
	cert, err := tls.X509KeyPair([]byte(d.Certificate), []byte(d.PrivateKey))
	pool := x509.NewCertPool()
	for _, ca := range append(d.CAChain, d.IssuingCA) {
		pool.AppendCertsFromPEM([]byte(ca))
	}
	return &cert, pool, time.Unix(d.Expiration, 0), err
}

func latest() *tls.Certificate { return current.Load().(*tls.Certificate) }

// dial a mesh service, verifying its DNS name (the address is an IP:port); the client
// certificate is the latest one at every handshake.
func dial(address, service string, pool *x509.CertPool) (*grpc.ClientConn, error) {
	return grpc.Dial(address, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		ServerName:           service + ".service." + td,
		RootCAs:              pool,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return latest(), nil },
	})))
}

// authorize lets only the coordinator call ExecuteTask (it carries a live task token), on
// the caller's verified certificate, before any handler runs.
func authorize(ctx context.Context, req interface{}, info *grpc.UnaryServerInfo, next grpc.UnaryHandler) (interface{}, error) {
	p, ok := peer.FromContext(ctx)
	var uris []string
	if ok {
		if tlsInfo, isTLS := p.AuthInfo.(credentials.TLSInfo); isTLS && len(tlsInfo.State.PeerCertificates) > 0 {
			for _, u := range tlsInfo.State.PeerCertificates[0].URIs {
				uris = append(uris, u.String())
			}
		}
	}
	if len(uris) != 1 {
		return nil, status.Error(codes.Unauthenticated, "no workload identity")
	}
	coordinator := "spiffe://" + td + "/service/coordinator"
	allowed := uris[0] == coordinator ||
		(info.FullMethod != "/tessera.v1.AgentService/ExecuteTask" && uris[0] == "spiffe://"+td+"/service/operator")
	if !allowed {
		return nil, status.Errorf(codes.PermissionDenied, "%s may not call %s", uris[0], info.FullMethod)
	}
	return next(ctx, req)
}

// -- the capability (the Python agent's support.technical) --------------------------------

var contract = &tesserav1.CapabilityContract{
	Name:            "support.technical",
	Version:         "1.0.0",
	Description:     "Match the ticket against known issues and note the fix (Go).",
	Reads:           []string{"ticket", "category"},
	Writes:          []string{"technical_notes"},
	Tools:           []string{"kb.search"},
	SideEffectClass: tesserav1.SideEffectClass_SIDE_EFFECT_CLASS_READ_ONLY,
	Timeout:         durationpb.New(10 * time.Second),
	MaxConcurrency:  32,
}

type agent struct {
	tesserav1.UnimplementedAgentServiceServer
	pool     *x509.CertPool
	mu       sync.Mutex
	answered map[string]*tesserav1.ExecuteTaskResponse // only successes are replayed
	order    []string                                  // answered's keys, oldest first
	proxies  map[string]tesserav1.ToolProxyServiceClient
	endpoint string
}

func (a *agent) descriptor() *tesserav1.AgentDescriptor {
	return &tesserav1.AgentDescriptor{Name: name, Version: "1.0.0-go", InstanceId: instance,
		Endpoint: a.endpoint, Capabilities: []*tesserav1.CapabilityContract{contract}}
}

func (a *agent) Describe(context.Context, *tesserav1.DescribeRequest) (*tesserav1.DescribeResponse, error) {
	return &tesserav1.DescribeResponse{Agent: a.descriptor()}, nil
}

func (a *agent) toolProxy(address string) (tesserav1.ToolProxyServiceClient, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if c, ok := a.proxies[address]; ok {
		return c, nil
	}
	conn, err := dial(address, "tool-proxy", a.pool)
	if err != nil {
		return nil, err
	}
	a.proxies[address] = tesserav1.NewToolProxyServiceClient(conn)
	return a.proxies[address], nil
}

func (a *agent) ExecuteTask(ctx context.Context, req *tesserav1.ExecuteTaskRequest) (*tesserav1.ExecuteTaskResponse, error) {
	if req.GetCapability() != contract.Name {
		return nil, status.Errorf(codes.InvalidArgument, "no capability %q", req.GetCapability())
	}
	tc := req.GetContext()
	key := fmt.Sprintf("%s/%s/%d", tc.GetWorkflowId(), tc.GetTaskId(), req.GetAttempt())
	a.mu.Lock()
	first, seen := a.answered[key]
	a.mu.Unlock()
	if seen {
		return first, nil
	}
	ticket := req.GetBlackboard()["ticket"].GetStructValue().AsMap()
	text, _ := ticket["text"].(string)
	query := text
	if len(query) > 500 {
		query = query[:500]
	} else if query == "" {
		query = "help"
	}
	tools, err := a.toolProxy(req.GetToolProxyEndpoint())
	if err != nil {
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	args, _ := structpb.NewStruct(map[string]interface{}{"query": query, "top_k": 1})
	callCtx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, "x-tessera-task-token", req.GetTaskToken()), 10*time.Second)
	defer cancel()
	found, err := tools.InvokeTool(callCtx, &tesserav1.InvokeToolRequest{
		Context:   &tesserav1.RequestContext{WorkflowId: tc.GetWorkflowId(), TaskId: tc.GetTaskId()},
		Tool:      "kb.search",
		Arguments: args,
		// One search per task, whatever the attempt: a retried attempt replays it.
		IdempotencyKey: tc.GetTaskId() + ":kb.search",
	})
	if err != nil {
		return nil, err // the proxy's status and details, unchanged (an approval gate, say)
	}
	fix := "collect logs"
	if hits := found.GetResult().GetFields()["hits"].GetListValue().GetValues(); len(hits) > 0 {
		fix += " (see " + hits[0].GetStructValue().GetFields()["id"].GetStringValue() + ")"
	}
	notes := fmt.Sprintf("ticket %v: %s [go agent]", ticket["id"], fix)
	output, _ := structpb.NewStruct(map[string]interface{}{"technical_notes": notes})
	answer := &tesserav1.ExecuteTaskResponse{
		Output:           &tesserav1.Payload{Kind: &tesserav1.Payload_Json{Json: output}},
		BlackboardWrites: map[string]*structpb.Value{"technical_notes": structpb.NewStringValue(notes)},
		Usage:            &tesserav1.Usage{Tokens: int64(len(text) / 4), ToolCalls: 1},
		Confidence:       0.8,
		HasConfidence:    true,
		Summary:          notes,
		InstanceId:       instance,
	}
	a.mu.Lock()
	a.answered[key] = answer
	a.order = append(a.order, key)
	if len(a.order) > maxAnswered { // a retry comes within minutes: older answers are dropped
		delete(a.answered, a.order[0])
		a.order = a.order[1:]
	}
	a.mu.Unlock()
	return answer, nil
}

// -- main -------------------------------------------------------------------------------

func main() {
	cert, pool, expires, err := issue()
	if err != nil {
		fmt.Fprintln(os.Stderr, "certificate:", err)
		os.Exit(1)
	}
	current.Store(cert)
	go func() { // renew at two thirds of the certificate's life
		for {
			time.Sleep(time.Until(expires) * 2 / 3)
			if next, _, exp, err := issue(); err == nil {
				current.Store(next)
				expires = exp
			} else {
				emit(map[string]string{"renewal_failed": err.Error()})
				time.Sleep(time.Second)
			}
		}
	}()

	listener, err := net.Listen("tcp", "127.0.0.1:"+envOr("TESSERA_AGENT_PORT", "0"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	a := &agent{pool: pool, answered: map[string]*tesserav1.ExecuteTaskResponse{},
		proxies: map[string]tesserav1.ToolProxyServiceClient{}, endpoint: listener.Addr().String()}
	server := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(&tls.Config{
			ClientAuth:     tls.RequireAndVerifyClientCert,
			ClientCAs:      pool,
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return latest(), nil },
		})),
		grpc.UnaryInterceptor(authorize),
		// The coordinator pings every 30 s, also between calls.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	tesserav1.RegisterAgentServiceServer(server, a)
	go func() { _ = server.Serve(listener) }()

	conn, err := dial(envOr("TESSERA_REGISTRY_ADDRESS", "127.0.0.1:50058"), "registry", pool)
	if err != nil {
		fmt.Fprintln(os.Stderr, "registry:", err)
		os.Exit(1)
	}
	registry := tesserav1.NewRegistryServiceClient(conn)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	for registered := false; ; {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		answer, err := registry.Register(ctx, &tesserav1.RegisterRequest{Agent: a.descriptor()})
		cancel()
		every := time.Second
		if err != nil {
			emit(map[string]string{"register_failed": err.Error()}) // again at the next beat
		} else {
			if !registered {
				emit(map[string]string{"registered": name, "instance_id": instance, "endpoint": a.endpoint})
				registered = true
			}
			every = answer.GetHeartbeatInterval().AsDuration()
		}
		select {
		case <-time.After(every):
		case <-stop:
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, _ = registry.Deregister(ctx, &tesserav1.DeregisterRequest{Name: name, InstanceId: instance})
			cancel()
			time.Sleep(time.Second) // answer stragglers routed before the entry went away
			done := make(chan struct{})
			go func() { server.GracefulStop(); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				server.Stop()
			}
			return
		}
	}
}
