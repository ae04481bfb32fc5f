"""Run the `account` agent: `python -m services.agents.account`."""

from services.agents.account.agent import agent

if __name__ == "__main__":
    agent.run()
