# console: serves the review console's pages and sessions. Its Vault use: its own token's
# upkeep and its own signing key (the checkpoints of its audit chain: refused logins); its
# certificate grant is rendered from vault/pki.yaml. People's logins go to the userpass
# mount with their own passwords, never with this identity's token.

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "transit/sign/audit-console" {
  capabilities = ["update"]
}
