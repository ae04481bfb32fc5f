"""Policy decision point: Cedar policies from `policy/`, every decision audited."""
