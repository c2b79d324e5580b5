"""Running the whole pipeline on one machine: ``streamcrawl crawl`` and the end-to-end tests.

- :mod:`.processes`: every stage as a child process (``streamcrawl run <stage>``), as pods.
- :mod:`.watch`: crawl progress read from Kafka offsets, and waiting until it drains.
- :mod:`.autoscale`: KEDA's replica formula and an HPA-like scaler for local fetchers.
- :mod:`.seeds`: the one builder of crawl.seeds records (``streamcrawl seed`` and ``crawl``).
- :mod:`.local`: the ``streamcrawl crawl`` command: stack, stages, seeds, progress, summary.
"""
