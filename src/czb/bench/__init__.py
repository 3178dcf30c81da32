"""``czb bench``: benchmark suites as content-keyed units of work, run locally or on Ray.

:mod:`~czb.bench.plan` turns a suite into units, :mod:`~czb.bench.store` keeps their
outputs, :mod:`~czb.bench.work` is what a worker runs, :mod:`~czb.bench.executors` run
jobs, and :mod:`~czb.bench.suite` schedules, retries and assembles result records.
"""
