"""Run the `credit` agent: `python -m services.agents.credit`."""

from services.agents.credit.agent import agent

if __name__ == "__main__":
    agent.run()
