"""Gateway control plane: an xDS (ADS) server feeding Envoy the live mesh."""
