"""czb: honest, fast benchmarks for single-cell foundation models.

The import is kept light on purpose (``czb --version`` must be instant): heavy
modules are imported where they are used. The notebook API loads on first use:
``czb.evaluate`` (:func:`czb.api.evaluate`) and ``czb.datasets`` (:mod:`czb.datasets`).
"""

__version__ = "0.1.0"

#: Attributes this module provides on first access (:func:`__getattr__`).
_LAZY = ("datasets", "evaluate")


def __getattr__(name: str):
    # Only what is asked for is imported, so `import czb` loads no anndata/pandas/scanpy.
    if name == "evaluate":
        from czb.api import evaluate

        return evaluate
    if name == "datasets":
        import czb.datasets as datasets  # noqa: PLR0402 - `from czb import` would re-enter __getattr__

        return datasets
    msg = f"module 'czb' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
