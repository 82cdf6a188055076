"""What every layer may use: where a name points (a folder, a Hub id, the embedded files) and the checks of options."""
