"""dynaplan: train LLM agents that decide when to plan (Crafter, POGS)."""

__version__ = "0.1.0"
