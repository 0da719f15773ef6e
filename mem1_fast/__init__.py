"""mem1_fast: fast, exact training of constant-memory LLM agents (MEM1, arXiv 2506.15841)."""

__version__ = "0.1.0"
