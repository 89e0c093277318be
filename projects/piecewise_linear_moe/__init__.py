"""R3: Jacobs et al. (1991) and Jordan & Jacobs (1994) on piecewise-linear regression."""
