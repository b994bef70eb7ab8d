"""qkit's benchmarks: ``cli`` is ``qkit bench`` (also ``python -m qkit.bench``), timing each
op against ``baselines`` (what users have instead); ``zeropp`` is the ZeRO++ chain
benchmark (``python -m qkit.bench.zeropp``)."""
