"""What a job reads: text, packed windows and the host's activations (cached or not), and the host, tokenizer and
Lorsas named on the command line."""
