"""Run the `fraud` agent: `python -m services.agents.fraud`."""

from services.agents.fraud.agent import agent

if __name__ == "__main__":
    agent.run()
