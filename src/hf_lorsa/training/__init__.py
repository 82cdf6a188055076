"""Training Lorsas with the Hugging Face Trainer: options, the run, the trainer and its mechanisms (head balance, the
collapse guard), the output folder."""
