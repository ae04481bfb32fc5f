"""Run the `document-analysis` agent: `python -m services.agents.document_analysis`."""

from services.agents.document_analysis.agent import agent

if __name__ == "__main__":
    agent.run()
