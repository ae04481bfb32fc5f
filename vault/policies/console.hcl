# console: serves the review console's pages and sessions. Its only Vault use is its own
# token's upkeep; its certificate grant is rendered from vault/pki.yaml. People's logins go
# to the userpass mount with their own passwords, never with this identity's token.

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
