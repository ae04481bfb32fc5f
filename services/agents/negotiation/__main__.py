"""Run the `negotiation` agent: `python -m services.agents.negotiation`."""

from services.agents.negotiation.agent import agent

if __name__ == "__main__":
    agent.run()
