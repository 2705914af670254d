"""A method is one registration: defined here, it runs from the CLI, in `compare` and in
`report` with no other edit, and its settings come from its own options and presets."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field

import pytest

from depthcut.cli import main
from depthcut.methods import MethodSpec, comparable, get_method, register, unregister
from depthcut.options import Option
from depthcut.run import read_records
from depthcut.settings import build_config, defaults, presets, resolve
from depthcut.sites import find_sites, linearize
from depthcut.stages import FINETUNE_OPTIONS, Method, StageRun, run_stages
from depthcut.train import TrainConfig
from tests.helpers import write_fake_cifar10


@dataclass
class FirstSitesConfig:
    sites: int = 1  # linearize this many sites, first in forward order, one per stage
    finetune: TrainConfig = field(default_factory=TrainConfig)


class FirstSites(Method):
    """Linearizes the first remaining site each stage (no entropy), `sites` stages."""

    name, title = "first_sites", "first sites"

    def __init__(self, config: FirstSitesConfig) -> None:
        self.config, self.finetune = config, config.finetune

    def stop_before(self, run: StageRun) -> str | None:
        done = run.last.stage - run.dense.stage
        return f"{done} sites linearized" if done >= self.config.sites else None

    def change(self, run: StageRun) -> dict:
        site = find_sites(run.model)[0]
        linearize(run.model, [site])
        linearized = [*run.last.linearized, site]
        return {"sites_linearized": len(linearized), "linearized": linearized,
                "chosen": [site], "order_chosen": len(linearized)}


def first_sites(model, splits, config: FirstSitesConfig, **kwargs):
    return run_stages(FirstSites(config), model, splits, **kwargs)


@pytest.fixture
def registered():
    spec = register(MethodSpec(
        name="first_sites", config=FirstSitesConfig, runner=first_sites, label="First sites",
        help="linearize the first sites in forward order",
        options=(Option("first_count", "sites to linearize", path="sites",
                        argparse={"type": int}),),
        training_options=FINETUNE_OPTIONS,
        presets={"quick": {"first_count": 2}, "paper": {"first_count": 4}},
        record_fields={"order_chosen": "entropy"}, order=55))
    yield spec
    unregister(spec.name)


def test_a_registered_method_gets_settings_presets_and_compare_names(registered):
    assert get_method("first-sites") is registered
    assert "first-sites" in comparable()
    assert defaults()["first_count"] == 1 and "first-sites" in defaults()["methods"]
    assert presets()["paper"]["first_count"] == 4
    config = build_config(FirstSitesConfig, resolve("paper", flags={"first_count": 3}))
    assert config.sites == 3 and config.finetune.epochs == 160  # paper finetune, shared
    assert build_config(FirstSitesConfig, resolve("quick")).sites == 2


def test_a_method_defined_in_a_test_runs_through_compare_and_report(registered, tmp_path):
    root = write_fake_cifar10(tmp_path / "data")
    out = tmp_path / "cmp"
    common = ["--dataset", "cifar10", "--data-root", str(root), "--width", "0.0625",
              "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "32", "--device",
              "cpu", "--no-progress"]
    assert main(["compare", *common, "--max-stages", "1", "--methods", "easier",
                 "first-sites", "--first-count", "2", "--no-fair-reference",
                 "--out", str(out)]) == 0
    records = read_records(out / "first-sites")
    assert [r["sites_linearized"] for r in records] == [0, 1, 2]
    assert list(records[1])[list(records[1]).index("order_chosen") + 1] == "entropy"
    assert records[0]["test_top1"] == read_records(out / "easier")[0]["test_top1"]
    config = json.loads((out / "first-sites" / "config.json").read_text())
    assert config["method"] == "first_sites" and config["first_sites"]["sites"] == 2
    assert main(["report", str(out / "easier"), str(out / "first-sites"), "--out",
                 str(tmp_path / "report"), "--no-progress"]) == 0
    with open(tmp_path / "report" / "table1.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert rows["First sites"]["sites removed"] == "2/17"
    with open(tmp_path / "report" / "table3_first-sites.csv") as handle:  # a cost table too
        assert [int(row["stage"]) for row in csv.DictReader(handle)] == [0, 1, 2]
    assert main(["first-sites", *common, "--out", str(tmp_path / "alone")]) == 0
    assert len(read_records(tmp_path / "alone")) == 3  # quick preset: first_count 2


def test_a_method_refuses_another_methods_settings():
    from depthcut.errors import ConfigError
    from depthcut.methods.rounds import PruningConfig

    spec = get_method("easier")
    assert spec.settings_or_defaults(None) == spec.config()
    with pytest.raises(ConfigError, match="EASIER takes a EasierConfig, got PruningConfig"):
        spec.settings_or_defaults(PruningConfig())
