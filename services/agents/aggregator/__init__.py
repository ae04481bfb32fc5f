"""The `aggregator` reference agent."""
