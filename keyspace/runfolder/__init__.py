"""The run folder, the contract between stages: its one owner.

files (the integrity boundary), store (names, manifest, moments), progress and analysis (checked
readers), calibration (the PCA basis file), verify (every file against its recorded sha256).
"""
