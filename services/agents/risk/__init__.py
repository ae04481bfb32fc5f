"""The `risk` reference agent."""
