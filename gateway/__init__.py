"""The OpenAI-compatible gateway (issue: gateway)."""
