"""Adapters users touch: LangGraph (``integrations.langgraph``) and transformers
(``integrations.transformers``). Each is imported on its own so that one
framework's absence does not break the other."""

__all__: list[str] = []
