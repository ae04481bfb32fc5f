"""The `compliance` reference agent."""
