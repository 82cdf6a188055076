"""Reading heads: top contexts, patterns, probes of known mechanisms, statistics, and the inspector behind the Space."""
