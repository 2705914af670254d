"""Prove that a refactor left behaviour unchanged: run a fixed set of short CLI runs (every
method, compare with the fair-compute reference, report, entropy, fold, a text run) and write a
fingerprint of what they produced; compare two fingerprints.

    python scripts/behaviour_check.py run OUT [--data-root ../shared/data]   # before and after
    python scripts/behaviour_check.py diff OUT_BEFORE OUT_AFTER

The fingerprint holds every records.jsonl (times left out), config.json, the sha256 of every
tensor of every checkpoint, folded_answer.json and the report's top-1 tables (latencies left
out: they are measured), the entropy and fold outputs (times left out), and every `--help` text
(lines sorted: the order of options may change). One thread, fixed seeds: the same code gives
the same digits on the same CPU. Runs take a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # unpickle folded models with this checkout's depthcut

# Timing fields and measured latencies: they differ between two runs of the same code.
TIMED = re.compile(r"seconds|elapsed|latency|wall|_ms|time|\bmin\b|built in")
TINY = ["--width", "0.0625", "--train-subset", "256", "--epochs", "1", "--batch-size", "64",
        "--no-progress"]
FINETUNE = ["--finetune-epochs", "1"]
METHODS = ["easier", "easier-k2", "easier-payoff", "nepenthe", "egp", "imp", "layer-folding",
           "progressive"]
COMMANDS = ["easier", "nepenthe", "egp", "imp", "layer-folding", "progressive", "compare",
            "report", "entropy", "fold", "heal"]


def depthcut(out: Path, *args: str) -> str:
    """`python -m depthcut ARGS` in `out` (relative paths in configs match between runs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "depthcut", *args], cwd=out, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"depthcut {' '.join(args)} failed ({done.returncode}):\n"
                         f"{done.stdout}\n{done.stderr}")
    return done.stdout


def run_all(out: Path, data_root: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = ["--dataset", "cifar10-jpeg", "--data-root", str(Path(data_root).resolve())]
    outputs = {}
    depthcut(out, "easier", *data, *TINY, *FINETUNE, "--max-stages", "2", "--out",
             "runs/easier")
    dense = ["--dense-checkpoint", "runs/easier/checkpoints/stage_00.pt"]
    for name in ("nepenthe", "egp", "imp"):
        depthcut(out, name, *data, *TINY, *FINETUNE, *dense, "--rounds", "2", "--out",
                 f"runs/{name}")
    depthcut(out, "layer-folding", *data, *TINY, *FINETUNE, *dense, "--k", "2", "--out", "runs/lf")
    depthcut(out, "progressive", *data, *TINY, *dense, "--max-stages", "2", "--out",
             "runs/progressive")
    depthcut(out, "easier", *data, *TINY, *FINETUNE, *dense, "--max-stages", "2", "--choose",
             "payoff", "--out", "runs/payoff")
    outputs["compare"] = depthcut(out, "compare", *data, *TINY, *FINETUNE, "--max-stages", "2",
                                  "--rounds", "2", "--methods", *METHODS, "--out",
                                  "runs/compare")
    outputs["report"] = depthcut(out, "report", "runs/easier", "runs/nepenthe", "runs/lf",
                                 "runs/progressive", "--out", "runs/report", "--no-progress")
    outputs["entropy"] = depthcut(out, "entropy", "--checkpoint",
                                  "runs/easier/checkpoints/stage_01.pt", "--samples", "500",
                                  "--no-progress")
    outputs["fold"] = depthcut(out, "fold", "--checkpoint", "runs/easier/checkpoints/stage_02.pt",
                               "--out", "runs/folded.pt", "--samples", "500", "--no-progress")
    depthcut(out, "easier", "--dataset", "fortunes-lang", "--data-root",
             str(Path(data_root).resolve()), "--train-subset", "300", "--epochs", "1",
             "--finetune-epochs", "1", "--max-stages", "1", "--no-progress", "--out", "runs/text")
    helps = {command: depthcut(out, command, "--help") for command in COMMANDS}
    helps["depthcut"] = depthcut(out, "--help")
    (out / "fingerprint.json").write_text(json.dumps(fingerprint(out / "runs", outputs, helps),
                                                     indent=1, sort_keys=True))


def untimed(value):
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not TIMED.search(k)}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def tensor_hashes(path: Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else {}
    if isinstance(payload, torch.nn.Module):
        state = payload.state_dict()
    hashes = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16]
              for k, v in state.items() if isinstance(v, torch.Tensor)}
    rest = {k: untimed(v) for k, v in payload.items() if k != "state_dict"} \
        if isinstance(payload, dict) else {}
    return {"tensors": hashes, "rest": json.loads(json.dumps(rest, default=repr))}


def text_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not TIMED.search(line)]


def fingerprint(runs: Path, outputs: dict, helps: dict) -> dict:
    result: dict = {"outputs": {k: text_lines(v) for k, v in outputs.items()},
                    "help": {k: sorted(v.split()) for k, v in helps.items()}}
    for path in sorted(runs.rglob("*")):
        key = str(path.relative_to(runs))
        if path.name == "records.jsonl":
            # Lists of [key, value] pairs: the order of keys in a line is compared too.
            result[key] = [list(untimed(json.loads(line)).items())
                           for line in path.read_text().splitlines()]
        elif path.name in ("config.json", "folded_answer.json"):
            result[key] = untimed(json.loads(path.read_text()))
        elif path.suffix == ".pt" and "snapshots" not in path.parts:
            result[key] = tensor_hashes(path)
        elif path.name in ("table1.csv",):
            result[key] = text_lines(path.read_text())
    return result


def diff(before: dict, after: dict, prefix: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        lines = []
        for key in sorted(set(before) | set(after)):
            if key not in after:
                lines.append(f"{prefix}{key}: only before")
            elif key not in before:
                lines.append(f"{prefix}{key}: only after")
            else:
                lines += diff(before[key], after[key], f"{prefix}{key}.")
        return lines
    return [] if before == after else [f"{prefix[:-1]}: {before!r} -> {after!r}"[:400]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    run.add_argument("out", type=Path)
    run.add_argument("--data-root", default="../shared/data")
    compare = commands.add_parser("diff")
    compare.add_argument("before", type=Path)
    compare.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run_all(args.out.resolve(), args.data_root)
        print(f"fingerprint in {args.out / 'fingerprint.json'}")
        return 0
    prints = [json.loads((p / "fingerprint.json").read_text()) for p in (args.before, args.after)]
    for printed in prints:  # filter the outputs again: TIMED may have grown since
        printed["outputs"] = {k: text_lines("\n".join(v)) for k, v in printed["outputs"].items()}
    lines = diff(*prints)
    print("\n".join(lines) or "identical")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
