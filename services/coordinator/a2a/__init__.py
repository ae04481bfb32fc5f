"""The A2A face of the coordinator (README.md, "A2A face")."""
