"""Make the inspector Space pushable as it is: build hf_lorsa's wheel into its folder.

    python scripts/build_space.py [--space spaces/lorsa-inspector]

The Space's requirements.txt installs that wheel (and through it torch, transformers, gradio, ...), so the
folder holds everything a Space needs; upload it with `huggingface-cli upload USER/SPACE spaces/lorsa-inspector
--repo-type space` and set the Space variable LORSA_ID.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "spaces" / "lorsa-inspector"), help="the Space folder")
    space = Path(parser.parse_args().space)
    requirements = (space / "requirements.txt").read_text().splitlines()
    wheels = [line.strip() for line in requirements if line.strip().endswith(".whl")]
    if len(wheels) != 1:
        raise SystemExit(f"{space / 'requirements.txt'} must name exactly one hf_lorsa wheel, found {wheels}.")
    for old in space.glob("hf_lorsa-*.whl"):
        old.unlink()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
         str(space), str(ROOT)], check=True,
    )  # fmt: skip
    built = sorted(p.name for p in space.glob("hf_lorsa-*.whl"))
    if built != [Path(wheels[0]).name]:
        raise SystemExit(f"Built {built}, but requirements.txt names {wheels[0]}: update requirements.txt.")
    print(f"Built {space / built[0]}; the folder {space} is ready to push as a Space.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
