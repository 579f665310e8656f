"""ChartSight inside the EHR: the HTTP service (``chartsight serve``) with CDS Hooks, the SMART app
page and the MCP server, and what secures them (authentication, patient-scoped authorization, audit,
rate limits)."""
