"""The Teach tab's numbers, one module per view, computed on any backbone and tested against independent
computations (the app only words and draws them): spectral experts and the values each method adapts
(``experts``), collapse measured (``collapse``), IMSE step by step on a stream against Source (``step``), domains
and retrieval (``domains``)."""
