"""Example ChartSight plug-ins, one of each kind (see ``pyproject.toml`` for their entry points).

- ``tools``: ``encounter_count``, a tool that declares the questions it answers, so the rule
  planner (and so ``chartsight ask``) calls it without a model.
- ``rules``: a planner rule: "kidney function" asks for the latest creatinine and eGFR.
- ``compactors``: a new resource type (``Flag``: chart alerts) and a built-in replaced by name
  (``Goal``, with its target's due date), which the registry logs.
- ``encoders``: ``char-ngrams``, a text encoder of hashed character trigrams (no model file).
- ``backends``: ``facts-only``, the evidence answer without quoted record lines.
"""
