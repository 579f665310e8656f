"""Example ChartSight plug-ins, one of each kind (see ``pyproject.toml`` for their entry points).

- ``tools``: ``encounter_count``, a tool that declares the questions it answers, so the rule
  planner (and so ``chartsight ask``) calls it without a model.
- ``rules``: a planner rule: "kidney function" also asks for the latest eGFR.
- ``compactors``: a new resource type (``Flag``: chart alerts) and a built-in replaced by name
  (``Goal``, with its target's due date), which the registry logs.
- ``encoders``: ``char-ngrams``, a text encoder of hashed character trigrams (no model file).
- ``backends``: ``facts-only``, the tools' statements alone (when no tool answered, the graph
  gives the evidence answer instead and flags the fallback).
"""
