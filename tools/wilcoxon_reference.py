#!/usr/bin/env python3
"""Reference p-values for vlsm's Wilcoxon signed-rank test (core/src/stats.rs tests): SciPy's
`scipy.stats.wilcoxon(d)` with its defaults (two-sided, zeros dropped, no continuity
correction, method "auto": exact, permutation or normal approximation by n, ties and zeros).
Prints Rust array literals for the test. Needs numpy and scipy."""

import numpy as np
from scipy.stats import wilcoxon

rng = np.random.default_rng(7)
cases = {
    "exact, n = 8": np.round(rng.normal(0.3, 1.0, 8), 3),
    "exact, n = 20": np.round(rng.normal(0.2, 1.0, 20), 4),
    "permutation (ties and a zero), n = 10": np.array([0.5, -0.5, 0.25, 0.0, 1.0, 0.75, 0.25, -0.125, 0.5, 2.0]),
    "normal approximation (ties), n = 30": np.round(rng.normal(0.1, 0.5, 30), 1),
    "normal approximation, n = 60": np.round(rng.normal(-0.1, 1.0, 60), 5),
}
for name, d in cases.items():
    p = wilcoxon(d).pvalue
    print(f"// {name}")
    print(f"(&[{', '.join(repr(float(v)) for v in d)}], {float(p)!r}),")
