"""``czb bench``'s executors: a suite's jobs in worker processes here
(:mod:`~czb.bench.executors.local`) or on a Ray cluster (:mod:`~czb.bench.executors.ray`).

Everything else a suite needs is the pipeline's, shared with ``czb run``:
:mod:`~czb.pipeline.plan` turns it into content-keyed units, :mod:`~czb.pipeline.execute`
schedules and retries them, :mod:`~czb.pipeline.work` is what a job runs,
:mod:`~czb.pipeline.store` keeps the outputs and :mod:`~czb.pipeline.assemble` makes
the result records.
"""
