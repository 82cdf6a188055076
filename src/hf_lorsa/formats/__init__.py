"""Formats for more than one Lorsa, or for other code: releases (one Lorsa per layer) and the authors' format."""
