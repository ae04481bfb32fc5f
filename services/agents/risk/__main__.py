"""Run the `risk` agent: `python -m services.agents.risk`."""

from services.agents.risk.agent import agent

if __name__ == "__main__":
    agent.run()
