"""The orchestrator service: holds the partition plan, tokenizes, and routes every step through
the stages in order."""
