"""The Lorsa model: its config, its modules (QK heads, OV heads, head selection), its initialisation from a host, how
it attaches to a host, and how it is stored (safetensors, model cards, the Hub, the authors' format)."""
