"""Run the `triage` agent: `python -m services.agents.triage`."""

from services.agents.triage.agent import agent

if __name__ == "__main__":
    agent.run()
