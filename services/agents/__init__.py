"""Reference agents of the four reference workflows (docs/reference-workflows.md).

One package per agent; ``python -m services.agents.<name>`` runs it.
"""
