"""ChartSight's agent layer: the question-answering graph and its surfaces (CLI, HTTP, MCP)."""
