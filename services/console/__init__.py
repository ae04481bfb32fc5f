"""The review console: pages and browser sessions (ConsoleService)."""
