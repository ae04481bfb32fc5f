"""The `negotiation` reference agent."""
