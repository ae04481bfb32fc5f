"""The `billing` reference agent."""
