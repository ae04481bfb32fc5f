"""The registry service: the one writer of the agent registry (RegistryService)."""
