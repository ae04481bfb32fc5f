# gateway-control-plane: serves xDS and SDS to Envoy. Its PKI grant (its own name, and Envoy's,
# whose certificate it delivers over SDS) is rendered from vault/pki.yaml.

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
