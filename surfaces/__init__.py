"""What people and other systems use: the ``chartsight`` command line, the HTTP service (with CDS
Hooks and the SMART app page) and the MCP server. They call ``agent.ChartSight`` for everything
about a patient, and ``connectors`` only to import data and administer the local store."""
