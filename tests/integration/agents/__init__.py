"""Small agents the integration tests deploy as their own processes
(``python -m tests.integration.agents.<name>``), and the helper that runs them."""
