"""Run the `aggregator` agent: `python -m services.agents.aggregator`."""

from services.agents.aggregator.agent import agent

if __name__ == "__main__":
    agent.run()
