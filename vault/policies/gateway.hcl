# gateway: Envoy's identity. Envoy never logs in to Vault (its certificate arrives over SDS from
# the gateway control plane); the role exists so the identity has a name and a PKI role.

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
