"""Train a Lorsa: `accelerate launch scripts/train.py --model_name_or_path ... --layer ... --dataset ...`

Same options as `hf-lorsa train`; a single .yaml/.json argument is read as an options file.
"""

from hf_lorsa.training.command import main

if __name__ == "__main__":
    raise SystemExit(main())
