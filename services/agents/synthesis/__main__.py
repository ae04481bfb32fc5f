"""Run the `synthesis` agent: `python -m services.agents.synthesis`."""

from services.agents.synthesis.agent import agent

if __name__ == "__main__":
    agent.run()
