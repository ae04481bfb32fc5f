"""The `triage` reference agent."""
