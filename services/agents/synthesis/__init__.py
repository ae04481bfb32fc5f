"""The `synthesis` reference agent."""
