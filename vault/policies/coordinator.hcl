# coordinator: issues one scoped child token per task through the `tessera-task` token role
# and revokes them (by accessor) when a task or workflow ends. It never reads a tool secret.

path "auth/token/create/tessera-task" {
  capabilities = ["update"]
}

path "auth/token/revoke-accessor" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

# Audit: sign checkpoints of this identity's own audit chains, with its own key only.
path "transit/sign/audit-coordinator" {
  capabilities = ["update"]
}

# The A2A face: sign agent cards with the card key, and publish its public half.
path "transit/sign/agent-cards" {
  capabilities = ["update"]
}

path "transit/keys/agent-cards" {
  capabilities = ["read"]
}
