"""The `fraud` reference agent."""
