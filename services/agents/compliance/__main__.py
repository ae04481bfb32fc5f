"""Run the `compliance` agent: `python -m services.agents.compliance`."""

from services.agents.compliance.agent import agent

if __name__ == "__main__":
    agent.run()
