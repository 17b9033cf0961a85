"""The validate stage: does Loki keep the model's accuracy at a given d and k, and why.

Modules, each a plain step that returns data (docs/validate.md):
  config    `ValidateConfig`: every option, declared once (the CLI is built from its fields)
  grid      parsing `--d`, `--k`, `--methods`, `--k-mode` into sweep points
  inputs    the run folder, calibration and ranks, checked against the model being validated
  evaluate  perplexity, recall, and the real-decoding check: measurements on a model
  passkey   the synthetic passkey-retrieval test
  stages    one function per section of validate.json
  run       `run_validate`: load, check, then every stage on the same windows
  results   the records, their statistics, and writing validate.json + the report

Arrows point one way: cli → validate → loki → kernels, and validate → reports. This package
file imports nothing, so the CLI can read `config` without importing torch.
"""
