"""The `document-analysis` reference agent."""
