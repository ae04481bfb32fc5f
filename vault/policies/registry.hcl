# registry: writes the agent registry (NATS) and its own audit chain; nothing else in Vault.

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

# Audit: sign checkpoints of this identity's own audit chains, with its own key only.
path "transit/sign/audit-registry" {
  capabilities = ["update"]
}
