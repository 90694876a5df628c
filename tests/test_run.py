"""End to end: `specialists run` on the tiny synthetic config (what CI runs)."""

import json

import pytest
from conftest import ROOT

from specialists.layout import DataLayout, RunLayout
from specialists.pipeline import format_seed_summary, seed_config, summarize_seeds


def test_run_tiny_end_to_end(tmp_path, cli):
    run = tmp_path / "run"
    args = ["--config", ROOT / "configs/tiny.yaml", "--set", f"data.shards={tmp_path}/data", "--set", f"run_dir={run}",
            "--set", "inference.control=true"]
    code, out, err = cli("run", *args)
    assert code == 0, err
    layout = RunLayout(run)
    for artifact in [layout.config, layout.generalist.weights, layout.generalist.card, layout.generalist.train_log,
                     layout.covariance, layout.clusters, layout.report_index, layout.specialist(0).weights,
                     layout.specialist(2).card, layout.control.weights, layout.metrics("test"), layout.stage_times,
                     layout.stage_memory]:
        assert artifact.is_file(), artifact
    assert DataLayout(tmp_path / "data").index.is_file()
    memory = json.loads(layout.stage_memory.read_text())
    assert list(memory) == ["prepare", "train-generalist", "cluster", "train-specialists", "train-control", "evaluate"]
    assert set(memory) == set(json.loads(layout.stage_times.read_text()))
    assert all(0.05 < gib < 16 for gib in memory.values())  # a real resident size, in GiB
    metrics = json.loads(layout.metrics("test").read_text())
    assert metrics["split"] == "test" and metrics["num_examples"] == 120 and metrics["num_specialists"] == 3
    gen, ens = metrics["predictors"]["generalist"], metrics["predictors"]["ensemble"]
    assert gen["correct"] == round(gen["top1"] * 120) and 0 <= ens["top1"] <= 1
    mc = ens["vs_generalist"]["mcnemar"]
    assert 0 <= mc["p_value"] <= 1 and mc["c"] - mc["b"] == ens["correct"] - gen["correct"]
    assert sum(row["num_examples"] for row in ens["vs_generalist"]["by_coverage"]) == 120
    assert "report" in out and "index.html" in out
    # a second run finds every stage finished and changes nothing
    stamp = layout.specialist(0).weights.stat().st_mtime_ns
    code, _, err = cli("run", *args)
    assert code == 0, err
    assert layout.specialist(0).weights.stat().st_mtime_ns == stamp
    # …and under a changed deciding value stops at the first stage it decides, in one line
    code, _, err = cli("run", *args, "--set", "specialists.steps=21")
    assert code == 2 and err.count("\n") == 1
    assert "specialist 0 trained with specialists.steps=20, the config now says 21" in err
    assert layout.specialist(0).weights.stat().st_mtime_ns == stamp


def test_seed_summary_mean_and_std():
    def metrics(g, e, p):
        return {"predictors": {"generalist": {"top1": g}, "ensemble": {"top1": e, "vs_generalist": {"mcnemar": {"p_value": p}}}}}

    rows = summarize_seeds({0: metrics(0.90, 0.91, 0.04), 1: metrics(0.92, 0.94, 0.01), 2: metrics(0.91, 0.91, 0.5)})
    assert rows["ensemble top-1"]["mean"] == pytest.approx(0.92)
    assert rows["ensemble top-1"]["std"] == pytest.approx(0.017320508, rel=1e-6)
    assert rows["generalist top-1"]["per_seed"] == {0: 0.90, 1: 0.92, 2: 0.91}
    assert "control top-1" not in rows
    assert "0.9200 ± 0.0173" in format_seed_summary(rows)


def test_seed_config_separates_runs():
    from specialists.config import load_config

    cfg = load_config(ROOT / "configs/tiny.yaml")
    a, b = seed_config(cfg, 1), seed_config(cfg, 2)
    assert (a.seed, b.seed) == (1, 2)
    assert a.run_dir.endswith("seed-1") and a.data == cfg.data and a != b


def test_cli_destroys_the_process_group_after_success(tmp_path, monkeypatch):
    """A launched stage tears its process group down itself; left to interpreter exit, gloo can abort a rank."""
    import torch.distributed as dist

    from specialists import cli

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(cli, "run_command", lambda func, args: 2)
        assert cli.main(["summary", str(tmp_path)]) == 2
        assert dist.is_initialized()  # a failed rank must not wait for the others
        monkeypatch.setattr(cli, "run_command", lambda func, args: 0)
        assert cli.main(["summary", str(tmp_path)]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
