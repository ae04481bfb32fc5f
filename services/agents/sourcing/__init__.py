"""The `sourcing` reference agent."""
