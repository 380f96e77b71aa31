"""The Teach tab's numbers, one module per view, computed on any backbone and tested against independent
computations (the app only draws them): spectral experts (``experts``), collapse measured (``collapse``), one
IMSE step dissected (``step``), domains and retrieval (``domains``)."""
