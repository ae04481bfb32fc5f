# nats: the identity of the NATS servers. nats-server cannot log in to Vault; `tessera up`
# logs in with this AppRole to issue the server certificate (its PKI grant, its own name
# only, is rendered from vault/pki.yaml).

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
