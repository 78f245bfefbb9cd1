"""rowcol's applications: the ``rowcol`` command and what it runs (train, eval, compare, bench,
export, analyze), with their run directories, data pipeline and configs.

The library (``rowcol.layers``, ``rowcol.models``, ``rowcol.halve``, ``rowcol.stats``) does not
import this package; importing it loads nothing until a module of it is imported.
"""
