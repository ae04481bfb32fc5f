"""The `account` reference agent."""
