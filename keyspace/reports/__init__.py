"""Rank report: pure plotting (figures.py), HTML assembly (html.py), and the pipeline (build.py)."""
