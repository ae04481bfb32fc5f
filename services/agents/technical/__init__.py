"""The `technical` reference agent."""
