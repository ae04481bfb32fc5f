"""Run the `sourcing` agent: `python -m services.agents.sourcing`."""

from services.agents.sourcing.agent import agent

if __name__ == "__main__":
    agent.run()
