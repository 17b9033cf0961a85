"""The collect stage: run a model over a corpus, capture pre- and post-RoPE keys (and queries),
and stream them into a run folder with exact float64 moments.

runner (the stage), config, capture (hooks), chunks (per-chunk accumulation), checkpoint
(commit points, lock), corpora (datasets and windowing).
"""
