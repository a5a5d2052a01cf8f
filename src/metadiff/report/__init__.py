"""One results page for every artifact of an outputs dir: `python -m metadiff.report` (see __main__.py).

collect (manifests + configs + plots -> runs), tables (runs -> per-stage tables with seed aggregates), plots (where
each plot goes in the report), render (Markdown and HTML), write (atomic output).
"""
