"""The ``tessera`` command: a thin registry of command modules."""

from __future__ import annotations

import typer

from tessera.cli import agents, audit, creds, demo, login, mesh, policy, vault, workflows

app = typer.Typer(
    name="tessera",
    help="Tessera: a gRPC mesh that runs multi-agent workflows under governance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

mesh.register(app)
login.register(app)
workflows.register(app)
demo.register(app)
app.add_typer(agents.app, name="agents")
app.add_typer(policy.app, name="policy")
app.add_typer(audit.app, name="audit")
app.add_typer(vault.app, name="vault")
app.add_typer(creds.app, name="creds")


if __name__ == "__main__":
    app()
