# operator: the local command line and launcher (health probes, administration RPCs). Its
# PKI grant (its own name) is rendered from vault/pki.yaml.

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

# Audit: the public halves of the checkpoint signing keys (every version), for
# `tessera audit verify` and `tessera audit export`. Transit never returns private keys here.
path "transit/keys" {
  capabilities = ["list"]
}

path "transit/keys/audit-*" {
  capabilities = ["read"]
}
