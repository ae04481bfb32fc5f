# operator: the local command line and launcher (health probes, administration RPCs). Its
# PKI grant (its own name) is rendered from vault/pki.yaml.

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
