"""The numerics of every stage as one fingerprint: run fixed-seed tiny fits and hash every exported tensor.

    python bench/fingerprint.py --save before.json      # a few minutes on 2 cores
    python bench/fingerprint.py --check before.json     # after a refactor: exit 1 if any tensor changed

SFT (20 steps) and its merge, the RM (16 steps, scored PPO needs it) and its merge, DPO (16), PPO scored by the
merged tiny RM (2 iterations), and RLOO and GRPO scored by a token rule (2 iterations each), all through the real
`python cli.py fit`. Each exported safetensors file under `output/` is read back and every tensor hashed
(sha256 of its bytes), so "unchanged" means `torch.equal` for every tensor of every export.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kill_stress import QUIET, ROOT, SCORER, environment  # noqa: E402


def run(work: Path, *args: str) -> None:
    """`cli.py <args>` in `work`; on failure its stderr is shown, not swallowed."""
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=work, env=environment(),
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"cli.py {' '.join(args)} failed in {work}:\n{done.stderr[-3000:]}")


def fit(work: Path, config: str, steps: int, *extra: str) -> None:
    run(work, "fit", "--config", str(ROOT / config), *QUIET, "--trainer.max_steps", str(steps), *extra)


def merge(work: Path, adapter: str) -> None:
    run(work, "merge", "--adapter_path", adapter)


def run_all(work: Path) -> None:
    fit(work, "configs/tiny/sft.yaml", 20)
    merge(work, "output/tiny/lora-alpaca")
    fit(work, "configs/tiny/rm.yaml", 16)
    merge(work, "output/tiny/reward_model")
    fit(work, "configs/tiny/dpo.yaml", 16)
    fit(work, "configs/tiny/ppo.yaml", 16)
    for name in ("rloo", "grpo"):
        fit(work, f"configs/tiny/{name}.yaml", 16, "--model.init_args.scorer", SCORER)


def fingerprint(work: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    prints = {}
    for path in sorted((work / "output").rglob("*.safetensors")):
        for key, tensor in sorted(load_file(path).items()):
            digest = hashlib.sha256(tensor.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy())
            prints[f"{path.relative_to(work)}::{key}"] = digest.hexdigest()[:16]
    return prints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--save", help="write the fingerprint to this JSON file")
    parser.add_argument("--check", help="compare with a fingerprint saved before")
    parser.add_argument("--work", help="work folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="fingerprint-"))
    work.mkdir(parents=True, exist_ok=True)
    run_all(work)
    prints = fingerprint(work)
    files = len({k.split("::")[0] for k in prints})
    print(f"{len(prints)} tensors in {files} exported files under {work}")
    if args.save:
        Path(args.save).write_text(json.dumps(prints, indent=1, sort_keys=True))
    if args.check:
        before = json.loads(Path(args.check).read_text())
        changed = sorted(k for k in before.keys() | prints.keys() if before.get(k) != prints.get(k))
        for key in changed[:20]:
            print(f"changed: {key}")
        print(f"{len(changed)} of {len(before.keys() | prints.keys())} tensors changed")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
