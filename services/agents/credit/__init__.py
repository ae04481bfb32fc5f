"""The `credit` reference agent."""
