"""Run the `churn` agent: `python -m services.agents.churn`."""

from services.agents.churn.agent import agent

if __name__ == "__main__":
    agent.run()
