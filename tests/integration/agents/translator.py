"""translate.text: a capability no reference agent offers, so a test can show the mesh
picking up an agent deployed on its own (and dropping it when it goes away)."""

from __future__ import annotations

from tessera.agent import Agent, TaskContext, TaskResult

agent = Agent("translator", version="1.0.0")


@agent.capability(
    "translate.text",
    version="1.0.0",
    side_effect="read_only",
    writes=["translation"],
    timeout_s=10,
)
async def translate(ctx: TaskContext) -> TaskResult:
    """Translate `text` (deterministically: the words in reverse order, upper-cased)."""
    text = str(ctx.get("text") or "")
    translation = " ".join(reversed(text.split())).upper()
    return TaskResult(
        output={"translation": translation, "instance": agent.instance_id},
        writes={"translation": translation},
        summary=translation,
    )


if __name__ == "__main__":
    agent.run()
