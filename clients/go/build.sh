#!/usr/bin/env bash
# Generate Tessera's Go client code with buf + LOCAL plugins and build the example client,
# fully offline, from Debian packages (Debian 12 "bookworm"):
#
#   apt-get install -y golang-go protoc-gen-go protoc-gen-go-grpc \
#     golang-google-grpc-dev golang-google-protobuf-dev golang-google-genproto-dev \
#     golang-github-golang-protobuf-1-5-dev
#
# Debian ships the Go libraries as sources under /usr/share/gocode (GOPATH layout, no
# go.mod), so this builds in GOPATH mode (GO111MODULE=off) with GOPATH =
# .build/go/gopath (our generated packages) : /usr/share/gocode (grpc, protobuf, genproto).
# No module proxy is contacted (GOPROXY=off). Output: .build/go/workflow, .build/go/agent.
#
# Exit 3 (and the apt-get line above) when a required tool or library is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."

GOCODE=${GOCODE:-/usr/share/gocode}
BUF=${BUF:-.venv/bin/buf}
PYTHON=${PYTHON:-.venv/bin/python}
missing=()
for tool in go protoc-gen-go protoc-gen-go-grpc; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
for pkg in google.golang.org/grpc google.golang.org/protobuf \
           google.golang.org/genproto/googleapis/rpc/status github.com/golang/protobuf/ptypes; do
  [ -d "$GOCODE/src/$pkg" ] || missing+=("$GOCODE/src/$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "go client: missing ${missing[*]}" >&2
  sed -n '5,7p' "$0" | sed 's/^#   //' >&2
  exit 3
fi

"$PYTHON" tools/proto_deps.py .build/protodeps
rm -rf .build/go/gopath
"$BUF" generate --template clients/go/buf.gen.yaml
for cmd in workflow agent; do
  GO111MODULE=off GOFLAGS= GOPROXY=off GOPATH="$PWD/.build/go/gopath:$GOCODE" \
    go build -o ".build/go/$cmd" "./clients/go/$cmd"
done
echo "built .build/go/workflow and .build/go/agent ($(go version | cut -d' ' -f3));" \
  "run: .build/go/workflow <gateway host:port>, or the agent (clients/go/agent/main.go)"
