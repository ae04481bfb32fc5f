# policy: authenticates to Vault but needs nothing beyond keeping its own token alive.
# Grant more here (and only here) when the service gains a Vault-backed feature.

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

# Audit: sign checkpoints of this identity's own audit chains, with its own key only.
path "transit/sign/audit-policy" {
  capabilities = ["update"]
}
