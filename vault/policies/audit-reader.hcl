# audit-reader: reads the audit trail back for people. The public halves of the checkpoint
# signing keys (every version: Transit never returns private keys here) to verify chains,
# and its own signing key for the checkpoints of its own chain (refused reads).

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "transit/keys" {
  capabilities = ["list"]
}

path "transit/keys/audit-*" {
  capabilities = ["read"]
}

path "transit/sign/audit-audit-reader" {
  capabilities = ["update"]
}
