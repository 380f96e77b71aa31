"""The method itself: spectral experts, the paper's formulas, SAM, the methods' contract, the domain bank."""
