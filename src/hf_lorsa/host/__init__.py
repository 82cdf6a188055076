"""The host boundary: what a host family looks like (its attention modules and weights), its masks, and the hooks that
read its attention layers and replace their outputs."""
