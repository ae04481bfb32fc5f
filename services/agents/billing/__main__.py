"""Run the `billing` agent: `python -m services.agents.billing`."""

from services.agents.billing.agent import agent

if __name__ == "__main__":
    agent.run()
