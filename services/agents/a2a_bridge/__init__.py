"""The A2A bridge: serves capabilities implemented by external A2A agents."""
