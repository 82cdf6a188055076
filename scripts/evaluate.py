"""Evaluate a Lorsa spliced into its model: `python scripts/evaluate.py --lorsa PATH_OR_ID --dataset DATA --max_tokens N`"""

import sys
from pathlib import Path

# This file's folder comes first on sys.path and its name would shadow the `evaluate` library.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from hf_lorsa.evaluation.command import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
