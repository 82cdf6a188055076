"""Splicing Lorsas into their host: FVU, L0, dead heads, loss recovered and KL, one layer or a whole release."""
