# tool-proxy: validates the task token an agent presents (metadata, remaining uses, TTL).
# It has no read on tool-secrets/: it reads a tool's secret WITH THE CALLER'S task token,
# so Vault itself refuses a secret the task was not scoped to.
#
# A person's call over MCP has no task token: once the policy allowed it, the proxy mints
# one for that call alone through the same token role (one use, a minute, the tool's
# secret policy only, usable only from the proxy's address) and reads the secret with it.

path "auth/token/lookup" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/create/tessera-task" {
  capabilities = ["update"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

# Audit: sign checkpoints of this identity's own audit chains, with its own key only.
path "transit/sign/audit-tool-proxy" {
  capabilities = ["update"]
}

# Audit: the HMAC key of secret-bearing arguments (read once at start).
path "tessera-audit/data/hmac-key" {
  capabilities = ["read"]
}
