-- The databases ChartSight keeps apart (the FHIR store is POSTGRES_DB, "chartsight"): conversation
-- threads (LangGraph's checkpoints), the audit log and the CDS Hooks store (jti, cards, feedback).
-- Run once, when the volume is new.
CREATE DATABASE chartsight_threads OWNER chartsight;
CREATE DATABASE chartsight_audit OWNER chartsight;
CREATE DATABASE chartsight_cds OWNER chartsight;
