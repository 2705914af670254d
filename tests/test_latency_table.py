"""The latency table (depthcut.cost.latency_table): segments cut out of the folded model and
timed, cached on disk by structure and context, reused without folding or timing again."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch import nn

import depthcut.cost.latency_table as latency_table
from depthcut.cost.latency_table import (
    LatencyTable,
    SegmentTimer,
    TableContext,
    build_segment_table,
    segments_within,
)
from depthcut.errors import ConfigError
from depthcut.fold import fold
from depthcut.sites import find_sites, linearize
from tests.helpers import (
    macs_timer_fixture,  # noqa: F401 - a fixture
    one_thread,  # noqa: F401
    randomize_batchnorm,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def chain_model() -> nn.Sequential:
    """A plain chain: 4 sites, convs that fold into fewer MACs once linear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    return randomize_batchnorm(model, torch.Generator().manual_seed(1))


class Block(nn.Module):
    """A residual block: two sites, a skip that crosses the segment between them."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(channels, channels, 1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(channels, channels, 1), nn.ReLU()

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))) + x)


def residual_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Block(4), Block(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


SAMPLE = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def context(batch: int = 2) -> TableContext:
    return TableContext("test-macs", batch)


def test_a_built_table_is_read_back_without_folding_or_timing(tmp_path, macs_timer,
                                                              monkeypatch):
    model, path = chain_model(), tmp_path / "table.json"
    first = build_segment_table(model, SAMPLE, context(), LatencyTable(path), span=4,
                                progress=False)
    assert len(first.seconds) == len(segments_within(4, 4)) == 15
    assert first.hits == 0 and first.misses == 16  # every segment and the call overhead
    assert macs_timer.calls == 16 and path.exists()
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 16

    calls = macs_timer.calls
    monkeypatch.setattr(latency_table, "fold", lambda *a, **k: pytest.fail("folded again"))
    again = build_segment_table(chain_model(), SAMPLE, context(), LatencyTable(path), span=4,
                                progress=False)
    assert again.seconds == first.seconds and again.misses == 0 and again.hits == 16
    assert macs_timer.calls == calls


def test_keys_name_the_backend_batch_device_threads_torch_and_merge_form(tmp_path,
                                                                       macs_timer):
    model = chain_model()
    table = LatencyTable(tmp_path / "table.json")
    timer = SegmentTimer(model, SAMPLE, context(batch=4), table, find_sites(model))
    key = timer.key(0, 2)
    assert key.startswith(f"test-macs|b4|cpu|t{torch.get_num_threads()}|torch{torch.__version__}"
                          "|macs|")
    assert timer.key(0, 2) == key and timer.key(0, 3) != key and timer.key(1, 2) != key
    other = SegmentTimer(model, SAMPLE, context(batch=8), table, find_sites(model))
    assert other.key(0, 2) != key and other.signature(0, 2) == timer.signature(0, 2)
    build_segment_table(model, SAMPLE, context(batch=4), table, span=1, progress=False)
    table_at_8 = build_segment_table(model, SAMPLE, context(batch=8), table, span=1,
                                     progress=False)
    assert table_at_8.hits == 0  # another batch is another entry
    with pytest.raises(ConfigError, match="unknown timer"):
        TableContext("no-such-backend", 1)


def test_identical_blocks_share_entries_and_weights_do_not_enter_the_key(tmp_path, macs_timer):
    model = residual_model()
    sites = find_sites(model)
    assert sites == ["1", "2.act1", "2.act2", "3.act1", "3.act2"]
    timer = SegmentTimer(model, SAMPLE, context(), LatencyTable(tmp_path / "t.json"), sites)
    assert timer.signature(2, 3) == timer.signature(4, 5)  # act1 -> act2 of either block
    assert timer.signature(1, 3) == timer.signature(3, 5)  # a whole block linear inside
    assert timer.signature(1, 2) != timer.signature(2, 3)
    reweighted = residual_model()
    with torch.no_grad():
        for parameter in reweighted.parameters():
            parameter.mul_(3)
    assert SegmentTimer(reweighted, SAMPLE, context(), timer.table, sites).key(1, 3) == \
        timer.key(1, 3)
    built = build_segment_table(model, SAMPLE, context(), timer.table, span=2, progress=False)
    assert built.hits > 0  # the second block read the first block's entries


def folded_seconds(timer, model: nn.Module, linear: list[str], batch: int = 2) -> float:
    """What the test timer gives the whole model folded (policy macs) at `batch`."""
    folded = fold(linearize(model, linear), SAMPLE.expand(2, -1, -1, -1), "macs")
    return timer.seconds(folded, SAMPLE.expand(batch, -1, -1, -1))


def test_on_a_chain_the_sum_of_segments_is_the_folded_model(tmp_path, macs_timer):
    """With a time proportional to MACs the estimate is exact for a chain: the cuts lose and
    double-count nothing, whichever sites a plan keeps."""
    sites = find_sites(chain_model())
    built = build_segment_table(chain_model(), SAMPLE, context(), LatencyTable(tmp_path / "t"),
                                span=len(sites), progress=False)
    n = len(sites)
    for keep in itertools.product([True, False], repeat=n):
        kept = [0, *(k + 1 for k in range(n) if keep[k]), n + 1]
        linear = [s for s, kept_site in zip(sites, keep, strict=True) if not kept_site]
        expected = folded_seconds(macs_timer, chain_model(), linear)
        assert built.plan_seconds(kept) == pytest.approx(expected, rel=1e-9), linear


def test_a_residual_block_is_cut_with_its_skip_as_an_input(tmp_path, macs_timer):
    model = residual_model()
    built = build_segment_table(model, SAMPLE, context(), LatencyTable(tmp_path / "t"),
                                span=5, progress=False)
    n = len(find_sites(model))
    for linear_sites in ([], ["2.act1"], ["2.act1", "2.act2"], find_sites(model)):
        kept = [0, *(k + 1 for k, s in enumerate(find_sites(model)) if s not in linear_sites),
                n + 1]
        expected = folded_seconds(macs_timer, residual_model(), linear_sites)
        assert built.plan_seconds(kept) == pytest.approx(expected, rel=1e-9), linear_sites


def test_an_unreadable_table_is_a_config_error(tmp_path):
    path = tmp_path / "table.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        LatencyTable(path)


def test_the_table_path_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHCUT_LATENCY_TABLE", str(tmp_path / "env.json"))
    assert LatencyTable().path == tmp_path / "env.json"
    assert LatencyTable(tmp_path / "given.json").path == tmp_path / "given.json"



def test_a_slice_that_does_not_fold_is_timed_as_it_is(tmp_path, macs_timer, monkeypatch):
    """Where folding a slice raises FoldError its ops are timed unmerged (inside sites
    removed), and the entry says so: the table still adds up to the model."""
    from depthcut.fold import FoldError

    def refuse(*args, **kwargs):
        raise FoldError("not this one")

    monkeypatch.setattr(latency_table, "fold", refuse)
    sites = find_sites(chain_model())
    built = build_segment_table(chain_model(), SAMPLE, context(), LatencyTable(tmp_path / "t"),
                                span=len(sites), progress=False)
    assert set(built.forms.values()) == {"unfolded"}
    entries = json.loads((tmp_path / "t").read_text())["entries"]
    assert {e.get("merge") for e in entries.values() if "segment" in e} == {"unfolded"}
    linear = sites[1:3]
    kept = [0, 1, 4, 5]
    unmerged = linearize(chain_model(), linear).eval()
    identities = 2 * 1e-7  # the linearized model still calls its 2 Identity modules
    assert built.plan_seconds(kept) == pytest.approx(
        macs_timer.seconds(unmerged, SAMPLE.expand(2, -1, -1, -1)) - identities, rel=1e-9)


class Shifted(nn.Module):
    """A parameter read by get_attr under a dotted name ("2.shift") inside a segment."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        return self.conv(x) * 2 + self.shift


def test_parameters_read_inside_a_segment_are_carried_into_it(tmp_path, macs_timer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Shifted(), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    table = LatencyTable(tmp_path / "t")
    timer = SegmentTimer(model, SAMPLE, context(), table, find_sites(model))
    assert timer.signature(1, 2) != timer.signature(0, 1)
    built = build_segment_table(model, SAMPLE, context(), table, span=2, progress=False)
    for linear, kept in (([], [0, 1, 2, 3]), (["1"], [0, 2, 3]), (["1", "3"], [0, 3])):
        expected = folded_seconds(macs_timer, copy.deepcopy(model), linear)
        assert built.plan_seconds(kept) == pytest.approx(expected, rel=1e-9), linear


def test_a_site_linearized_earlier_shares_the_entry_of_a_linear_site_inside(tmp_path,
                                                                          macs_timer):
    """After a stage linearizes a site (an Identity now), the segments across it are the dense
    model's segments with that site inside: the same keys, nothing timed again."""
    dense = chain_model()
    table = LatencyTable(tmp_path / "t")
    sites = find_sites(dense)
    before = SegmentTimer(dense, SAMPLE, context(), table, sites)
    later_model = linearize(chain_model(), [sites[1]])
    later = SegmentTimer(later_model, SAMPLE, context(), table, find_sites(later_model))
    assert later.signature(1, 2) == before.signature(1, 3)  # across the removed site
    assert later.signature(0, 1) == before.signature(0, 1)
    assert later.signature(1, 2) != before.signature(1, 2)
    build_segment_table(dense, SAMPLE, context(), table, span=4, progress=False)
    again = build_segment_table(later_model, SAMPLE, context(), table, span=4, progress=False)
    assert again.misses == 0 and again.hits == len(again.seconds) + 1
