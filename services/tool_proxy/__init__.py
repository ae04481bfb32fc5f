"""The tool proxy: the only road from an agent to a tool (see README.md)."""
