"""Run the `technical` agent: `python -m services.agents.technical`."""

from services.agents.technical.agent import agent

if __name__ == "__main__":
    agent.run()
