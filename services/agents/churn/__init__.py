"""The `churn` reference agent."""
