"""Example tool backends for the tool proxy."""
