"""Run the A2A bridge: `python -m services.agents.a2a_bridge` (needs TESSERA_A2A_AGENTS_FILE)."""

from services.agents.a2a_bridge.agent import main

if __name__ == "__main__":
    main()
