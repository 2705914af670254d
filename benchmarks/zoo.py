"""Fold any model users bring: a zoo of timm, torchvision and transformers models checked end
to end, and the table of what each gives (docs/zoo.md).

Each model is built as `--model LIBRARY:NAME` builds it (`models.build_external`: random init,
activations one module per site), its BatchNorm statistics perturbed and its all-zero weights
(zero-initialised heads) made random, and run on 64x64 images
(token ids (2, 32) for
transformers' text models). Checked: sites are found, their entropies are finite, and
with every second site linear, then with every site linear, the fold is exact against a float64
evaluation of the unfolded model (`FoldReport.agrees_in_float64`) and BatchNorm folds wherever
the model has one. `tests/test_zoo.py` asserts this per model; `main` runs every model in its
own process with a timeout and writes the table:

    PYTHONPATH=. OMP_NUM_THREADS=2 /work/venv-zoo/bin/python benchmarks/zoo.py [--timeout 600]

(`--only NAME ... --merge` runs those rows again and puts them into the table by name.)

It needs torch 2.14.1, torchvision 0.29.1, timm 1.0.31 and transformers (docs/zoo.md says how
to install them; about 5.5 GB).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

IMAGE_SIZE = 64
TOKENS = 32
_SMALL_TEXT = ("hidden_size=64,num_hidden_layers=2,num_attention_heads=2,"
               "intermediate_size=128,vocab_size=500,max_position_embeddings=64")

TORCHVISION = [
    "alexnet", "vgg11_bn", "vgg16", "resnet18", "resnet50", "resnext50_32x4d",
    "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf",
    "shufflenet_v2_x1_0", "squeezenet1_1", "densenet121", "mnasnet1_0", "convnext_tiny",
    "swin_t", "vit_b_16",
]
TIMM = [
    "resnet18", "resnet50d", "resnetv2_50", "mobilenetv2_100", "mobilenetv3_small_100",
    "mobilenetv3_large_100", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0",
    "mixnet_s", "fbnetc_100", "spnasnet_100", "semnasnet_100", "lcnet_050", "tinynet_a",
    "mnasnet_100", "regnetx_002", "regnety_002", "rexnet_100", "ghostnet_100", "dla34",
    "densenet121", "dpn68", "vgg11", "vgg11_bn", "repvgg_a0", "mobileone_s0", "cspresnet50",
    "darknet53", "hrnet_w18_small", "tresnet_m", "convnext_atto", "mobilevit_xxs",
    "efficientvit_b0", "fastvit_t8", "edgenext_xx_small", "poolformer_s12",
    "vit_tiny_patch16_224:patch_size=8", "deit_tiny_patch16_224:patch_size=8",
    "mixer_s16_224", "resmlp_12_224",
]
TRANSFORMERS = [
    *(f"{name}:{_SMALL_TEXT}" for name in ("bert", "roberta", "electra", "albert", "mpnet")),
    "distilbert:dim=64,n_layers=2,n_heads=2,hidden_dim=128,vocab_size=500,"
    "max_position_embeddings=64",
    "gpt2:n_embd=64,n_layer=2,n_head=2,vocab_size=500,n_positions=64,pad_token_id=0",
    "vit:hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128,"
    "patch_size=8",
]
ZOO = ([f"torchvision:{name}" for name in TORCHVISION] + [f"timm:{name}" for name in TIMM]
       + [f"hf:{name}" for name in TRANSFORMERS])


def library_of(name: str) -> str:
    return {"torchvision": "torchvision", "timm": "timm", "hf": "transformers"}[
        name.split(":")[0]]


def _randomize_zero_weights(model: nn.Module, generator: torch.Generator) -> list[str]:
    """Random values for every weight tensor (2 dims or more) that is all zeros, as libraries
    initialise classifier heads (torchvision's ViT, timm's MLP-Mixer): a zero head makes every
    output zero, and a fold compared on zeros tests nothing. Returns their names."""
    names = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and not parameter.any():
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator)
                                / math.sqrt(fan_in))
                names.append(name)
    return names


def _batchnorms_left(folded: nn.Module) -> int:
    """BatchNorm modules and F.batch_norm calls the folded model still runs."""
    left = sum(1 for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    for module in folded.modules():
        graph = getattr(module, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            left += sum(1 for n in graph.nodes
                        if n.target is torch.nn.functional.batch_norm)
    return left


def _fold_row(model: nn.Module, x: torch.Tensor) -> dict:
    from depthcut.fold import fold

    start = time.perf_counter()
    folded = fold(model, x)
    report = folded.fold_report
    return {"batchnorms_left": _batchnorms_left(folded),
            "macs": report.macs_after / report.macs_before, "exact": report.exact,
            "agrees": report.agrees_in_float64, "float64_error": report.float64_error,
            "float32_noise": report.float32_noise, "unfolded": report.unfolded_parts,
            "seconds": time.perf_counter() - start,
            "merges": sum(1 for m in report.merges if m.taken)}


def check_model(name: str) -> dict:
    """Build, count, linearize and fold one zoo model; the row of the table."""
    from depthcut.entropy import measure_entropy
    from depthcut.masks import clone_model
    from depthcut.models import build_external
    from depthcut.sites import find_sites, linearize
    from depthcut.untrained import randomize_batchnorm

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    text = name.startswith("hf:") and not name.startswith("hf:vit:")
    model = build_external(name, 10, 3, image_size=None if text else IMAGE_SIZE).eval()
    randomize_batchnorm(model, generator, shift=0.2)  # so folding them is tested
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
                     for m in model.modules())
    _randomize_zero_weights(model, generator)
    x = (torch.randint(1, 500, (2, TOKENS), generator=generator) if text
         else torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator))
    sites = find_sites(model)
    entropies = measure_entropy(model, [x])
    row = {"name": name, "sites": len(sites), "batchnorms": batchnorms,
           "entropies_finite": all(math.isfinite(h) for h in entropies.values())}
    for key, chosen in (("half", sites[::2]), ("all", sites)):
        linear = linearize(clone_model(model), chosen)
        row[key] = _fold_row(linear, x)
    row["batchnorms_left"] = row["half"]["batchnorms_left"]  # BatchNorm folds, sites or not
    row["passed"] = passed(row)
    return row


def passed(row: dict) -> bool:
    folds = [row[key] for key in ("half", "all") if key in row]
    return (row.get("sites", 0) > 0 and row.get("entropies_finite", False) and len(folds) == 2
            and all(f["exact"] and f["agrees"] for f in folds)
            and (row["batchnorms"] == 0 or row["batchnorms_left"] < row["batchnorms"]))


def _run_one(name: str, timeout: int) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timed out after {timeout} s", "passed": False,
                "minutes": timeout / 60}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        row = {"name": name, "error": tail[:200], "passed": False}
    else:
        row = json.loads(lines[-1])
    row["minutes"] = (time.perf_counter() - start) / 60
    return row


def _cell(fold_row: dict | None) -> str:
    if not fold_row:
        return "-"
    verdict = "exact" if fold_row["exact"] and fold_row["agrees"] else "NOT exact"
    error = f"{fold_row['float64_error']:.1e}"
    noise = fold_row.get("float32_noise")
    if verdict == "exact" and noise is not None and fold_row["float64_error"] > 1e-4:
        # Large only because the unfolded model itself is that far off in float32: say so, so
        # that an exact fold never reads as a wrong one.
        error += f"; unfolded float32 alone {noise:.1e}: rounding"
    return f"{fold_row['macs']:.3f}x, {verdict} ({error}), {fold_row['seconds']:.1f} s"


def write_table(rows: list[dict], path: Path, minutes: float) -> None:
    passing = sum(1 for row in rows if row.get("passed"))
    lines = [
        "# The zoo: folding models users bring",
        "",
        f"Written by `benchmarks/zoo.py` ({len(rows)} models, {passing} pass, "
        f"{100 * passing / max(len(rows), 1):.0f}%; {minutes:.0f} minutes on 2 shared CPU "
        "cores). Random init, BatchNorm statistics perturbed, all-zero weights "
        "(zero-initialised heads) made random, 64x64 images (token ids (2, 32) "
        "for transformers), fold policy `macs`. MACs are folded/unfolded; the error is the "
        "folded float32 model's relative error against the unfolded model evaluated in "
        "float64; a pass needs sites, finite entropies, both folds exact against float64 and "
        "BatchNorm folded where the model has one.",
        "",
        "Install (large: about 5.5 GB, CUDA wheels included; local disk, no extra index URL):",
        "`python3 -m venv /work/venv-zoo && /work/venv-zoo/bin/pip install torch==2.14.1 "
        "torchvision==0.29.1 timm==1.0.31 transformers pytest`; run with the checkout first "
        "on the path: `PYTHONPATH=. /work/venv-zoo/bin/python benchmarks/zoo.py` (or "
        "`-m pytest tests/test_zoo.py`); `--only NAME ... --merge` runs some rows again into "
        "this table.",
        "",
        "| model | sites | BN (left) | every second site linear | every site linear | "
        "left unfolded | pass |",
        "| --- | ---: | ---: | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | - | - | - | - | error: "
                         f"{row['error'].replace('|', '/')} | no |")
            continue
        unfolded = "; ".join(row["all"]["unfolded"]).replace("|", "/") or "-"
        lines.append(
            f"| {row['name']} | {row['sites']} | {row['batchnorms']} "
            f"({row['batchnorms_left']}) | {_cell(row['half'])} | {_cell(row['all'])} | "
            f"{unfolded[:160]} | {'yes' if row['passed'] else 'no'} |")
    path.write_text("\n".join(lines) + "\n" + notes_after_table(path))


def notes_after_table(path: Path) -> str:
    """The hand-written text below the table of an earlier `path` (how it was made, why the
    failures fail), kept when the table is written again; "" if there is none."""
    if not path.exists():
        return ""
    lines = path.read_text().splitlines()
    rows = [index for index, line in enumerate(lines) if line.startswith("|")]
    rest = lines[rows[-1] + 1:] if rows else []
    return "\n".join(rest) + "\n" if any(line.strip() for line in rest) else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="check one model and print its row as JSON")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model")
    parser.add_argument("--out", default="docs/zoo.md")
    parser.add_argument("--only", nargs="*", help="these zoo names only")
    parser.add_argument("--from-json", help="write the table from the rows of an earlier run")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: put the new rows into the table's JSON (by name, "
                             "in zoo order; rows of names no longer in the zoo dropped) instead "
                             "of writing a table of these rows alone")
    args = parser.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        write_table(rows, Path(args.out), sum(row.get("minutes", 0.0) for row in rows))
        return
    if args.one:
        print(json.dumps(check_model(args.one)))
        return
    table_json = Path(args.out).with_suffix(".json")
    earlier = json.loads(table_json.read_text()) if args.merge and table_json.exists() else []
    rows: list[dict] = []
    for name in args.only or ZOO:
        rows.append(_run_one(name, args.timeout))
        print(f"{name}: {'pass' if rows[-1].get('passed') else 'FAIL'} "
              f"({rows[-1]['minutes']:.1f} min) {rows[-1].get('error', '')}", flush=True)
        table = merge_rows(earlier, rows) if args.merge else rows
        table_json.write_text(json.dumps(table, indent=1))
    write_table(table, Path(args.out), sum(row.get("minutes", 0.0) for row in table))


def merge_rows(earlier: list[dict], new: list[dict]) -> list[dict]:
    """The zoo's rows in zoo order: each name's new row where it ran again, else its earlier
    one (names no longer in the zoo are dropped, names not yet run are left out)."""
    by_name = {row["name"]: row for row in earlier} | {row["name"]: row for row in new}
    return [by_name[name] for name in ZOO if name in by_name]


if __name__ == "__main__":
    main()
