"""Per-linear level search (issue 28): which sparsity and width each decoder linear gets under a budget of
stored bits.

``levels`` builds the level database (every compressed decoder linear at every level, with its exact stored
bits and its output loss), the knapsack gives the start, ``evo`` improves it by an evolutionary search
(EvoPress's scheme: budget-keeping level switches, multi-step selection on growing window counts) and
``fitness`` scores a configuration by the KL divergence of the stitched model from the dense one, reusing the
hidden states of the layers before a candidate's first change. The search is torch-free in ``evo`` (fitness
is a callable), so its budget and selection logic is tested against brute force on toy instances.
"""
