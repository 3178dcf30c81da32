"""czb: honest, fast benchmarks for single-cell foundation models.

The import is kept light on purpose (``czb --version`` must be instant): heavy
modules are imported where they are used.
"""

__version__ = "0.1.0"
