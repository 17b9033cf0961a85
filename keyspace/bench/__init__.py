"""Speed measurements on a GPU: the decode kernels alone (`kernels`) and whole decode steps (`e2e`).

A benchmark is not a kernel: this package times `keyspace.kernels` and `keyspace.loki` from the
outside through their public entry points. The CLI's `keyspace bench` and validate's speed stage
call it; scripts under benchmarks/ wrap it.
"""
