import io
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, error_lines, tiny_overrides, write_clusters

from specialists import dustbin_bias
from specialists.artifacts.model_card import load_model, read_card
from specialists.bias import fit_bias_and_temperature
from specialists.config import DataConfig, load_config
from specialists.data import ShardIndex, load_split, normalize
from specialists.data.enriched import EnrichedStream
from specialists.layout import RunLayout
from specialists.models import create_model
from specialists.models.surgery import (
    CollapsedHead,
    collapse_logits,
    collapse_probs,
    make_specialist,
    map_labels,
    penultimate_features,
)
from specialists.train.losses import specialist_loss

GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [1, 5, 9]]


# --- the dustbin bias (DESIGN.md step 4) -------------------------------------------------


@pytest.mark.parametrize("pi, f, expected", [
    (0.2, 0.5, math.log(4.0)),                       # f = ½: log((1 − π)/π)
    (0.5, 0.5, 0.0),                                 # no enrichment, no correction
    (0.1, 0.5, math.log(9.0)),
    (0.5, 0.25, math.log(1 / 3)),                    # under-sampled specialist classes: negative
    (0.02, 0.8, math.log(4.0) + math.log(49.0)),
])
def test_dustbin_bias_hand_computed(pi, f, expected):
    assert dustbin_bias(pi, f) == pytest.approx(expected, rel=1e-12)


def test_dustbin_bias_is_the_exact_prior_shift():
    """Reweighting the training mix back to the data prior gives exactly the bias's odds ratio."""
    pi, f = 0.15, 0.5
    train_odds_dustbin = (1 - f) / f
    data_odds_dustbin = (1 - pi) / pi
    assert math.exp(dustbin_bias(pi, f)) == pytest.approx(data_odds_dustbin / train_odds_dustbin)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_dustbin_bias_rejects_fractions_outside_0_1(bad):
    with pytest.raises(ValueError, match="expected a fraction strictly between 0 and 1"):
        dustbin_bias(bad)
    with pytest.raises(ValueError, match="special_fraction_in_training"):
        dustbin_bias(0.3, bad)


# --- labels and surgery ---------------------------------------------------------------------


def test_map_labels_and_collapse():
    labels = torch.tensor([3, 7, 0, 9, 7])
    assert map_labels(labels, [3, 7], 10).tolist() == [0, 1, 2, 2, 1]
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert torch.allclose(collapse_probs(probs, [1, 3]), torch.tensor([[0.2, 0.4, 0.4]]))


def _generalist_and_images():
    torch.manual_seed(0)
    model = create_model("compact_cnn", num_classes=12, in_channels=1, image_size=16, width=8).eval()
    with torch.no_grad():
        model.fc.weight.mul_(20)  # confident, varied predictions like a trained net
    return model, torch.randn(256, 1, 16, 16)


def test_surgery_keeps_the_generalist_within_the_set():
    generalist, images = _generalist_and_images()
    classes = [2, 5, 7]
    with torch.no_grad():
        feats, logits = penultimate_features(generalist, images)
        spec = make_specialist(generalist, classes, features=feats, logits=logits).eval()
        p_g = F.softmax(generalist(images), dim=1)
        p_s = F.softmax(spec(images), dim=1)
    assert p_s.shape == (256, 4)
    within_g = p_g[:, classes] / p_g[:, classes].sum(1, keepdim=True)
    within_s = p_s[:, :3] / p_s[:, :3].sum(1, keepdim=True)
    assert torch.allclose(within_s, within_g, atol=1e-5)
    # the dustbin starts near the generalist's mass outside the set (fitted row beats Jensen's bound)
    outside = 1 - p_g[:, classes].sum(1)
    fitted_err = (p_s[:, -1] - outside).abs().mean().item()
    with torch.no_grad():
        plain = F.softmax(make_specialist(generalist, classes)(images), dim=1)
    plain_err = (plain[:, -1] - outside).abs().mean().item()
    assert fitted_err < 0.05 and fitted_err < plain_err
    # the generalist itself is untouched
    assert generalist.fc.out_features == 12


@pytest.mark.parametrize("head", ["dustbin", "full"])
def test_specialist_trains_its_whole_body_even_from_a_frozen_generalist(head):
    generalist, images = _generalist_and_images()
    generalist.requires_grad_(False)  # as the training stage holds it (it only gives soft targets)
    spec = make_specialist(generalist, [1, 2], head=head)
    assert all(p.requires_grad for p in spec.parameters())
    spec(images[:8]).logsumexp(1).sum().backward()
    assert spec.features[0].weight.grad is not None and spec.features[0].weight.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in generalist.parameters())


def test_full_head_collapses_to_set_plus_dustbin():
    generalist, images = _generalist_and_images()
    classes = [0, 4]
    full = make_specialist(generalist, classes, head="full")
    collapsed = CollapsedHead(full, classes).eval()
    with torch.no_grad():
        p = F.softmax(collapsed(images), dim=1)
        ref = collapse_probs(F.softmax(generalist(images), dim=1), classes)
    assert torch.allclose(p, ref, atol=1e-5)


def test_soft_target_loss_is_zero_gradient_at_the_teacher():
    """Section 6.1: with the generalist's own collapsed logits the soft term's gradient vanishes."""
    general = torch.randn(8, 6)
    classes = [1, 4]
    z = torch.cat([general[:, classes], general[:, [0, 2, 3, 5]].logsumexp(1, keepdim=True)], 1).requires_grad_()
    assert torch.allclose(z, collapse_logits(general, classes))
    loss = specialist_loss(z, general, torch.zeros(8, dtype=torch.long), classes, 6, soft_target_weight=1.0,
                           temperature=3.0)
    loss.backward()
    assert z.grad.abs().max() < 1e-6


def test_fit_bias_and_temperature_recovers_a_planted_shift():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 4) * 2
    targets = torch.distributions.Categorical(logits=true_logits).sample()
    shifted = true_logits * 2.0  # an over-confident model whose dustbin is 1.5 nats too low (after T)
    shifted[:, -1] -= 3.0
    b, t = fit_bias_and_temperature(shifted, targets)
    assert t == pytest.approx(2.0, rel=0.1)
    assert b == pytest.approx(1.5, abs=0.15)


# --- the enriched stream ----------------------------------------------------------------


def test_enriched_stream_fraction_labels_and_reads(tiny_shards):
    index = ShardIndex.load(tiny_shards)
    cfg = DataConfig(image_size=16, channels=1, mean=(0.5,), std=(0.25,), augment="none", shuffle_buffer=64)
    classes = [4, 5, 6, 7]
    stream = EnrichedStream(index, cfg, classes, special_fraction=0.5, batch_size=50, seed=0)
    it = iter(stream)
    labels, flags = [], []
    for _ in range(200):  # 10,000 samples
        images, y, special = next(it)
        labels.append(y)
        flags.append(special)
    labels, flags = torch.cat(labels), torch.cat(flags)
    in_set = torch.isin(labels, torch.tensor(classes))
    assert len(labels) == 10_000
    assert abs(in_set.float().mean().item() - 0.5) <= 0.02
    assert torch.equal(in_set, flags)
    counts = Counter(labels[in_set].tolist())
    assert all(abs(counts[c] / 5000 - 0.25) < 0.03 for c in classes)  # natural proportions within Sᵐ
    rest = Counter(labels[~in_set].tolist())
    assert set(rest) == set(range(12)) - set(classes)
    assert all(abs(rest[c] / 5000 - 1 / 8) < 0.03 for c in rest)
    # the special part reads only the by-class shards of its classes
    special_shards = {u for urls in stream.class_urls.values() for u in urls}
    assert special_shards == {u for u, _ in index.byclass_shards(classes)}
    assert len(special_shards) < len(index.meta["byclass"]["shards"])
    # reads vs use, from the index. A class stream reads only its class's byte range, so the
    # special part reads what it uses plus each class's shuffle buffer (≤ its count, ≤ 64 here);
    # the rest discards Sᵐ samples (π = 1/3): 5000 / (2/3) reads.
    train_counts = index.class_counts("train")
    buffers = sum(min(64, int(train_counts[c])) for c in classes)
    assert stream.stats.used == 10_000
    assert 5000 <= stream.stats.read_special <= 5000 + buffers
    assert 7500 * 0.95 < stream.stats.read_rest < 7500 + 64 + 2 * 50
    # filtering the train split for Sᵐ instead would read 5000 / π = 15,000 samples for the special part
    assert stream.stats.read_special < 0.4 * 15_000


def test_enriched_stream_byte_ranges_and_the_scan_fallback(tiny_shards, monkeypatch):
    """The recorded byte ranges hold exactly one class's samples; shards prepared without them
    are scanned and filtered instead, with the same labels coming out."""
    import webdataset as wds

    index = ShardIndex.load(tiny_shards)
    for c in (0, 5, 11):
        got = []
        for url, n, start, end in index.byclass_ranges(c):
            with open(url, "rb") as f:
                f.seek(start)
                stream = io.BytesIO(f.read(end - start))
            labels = [int(smp["cls"]) for smp in wds.tariterators.group_by_keys(
                wds.tariterators.tar_file_expander([{"url": url, "stream": stream}]))]
            assert len(labels) == n
            got += labels
        assert got == [c] * int(index.class_counts("train")[c])
    cfg = DataConfig(image_size=16, channels=1, mean=(0.5,), std=(0.25,), augment="none", shuffle_buffer=64)
    monkeypatch.setattr(ShardIndex, "byclass_ranges", lambda self, c: None)
    stream = EnrichedStream(index, cfg, [4, 5], special_fraction=0.5, batch_size=50, seed=0)
    _, y, special = next(iter(stream))
    assert set(y[special].tolist()) <= {4, 5} and not set(y[~special].tolist()) & {4, 5}
    assert stream.stats.read_special > 25  # scanning reads the neighbours too


def test_enriched_stream_rejects_bad_sets(tiny_shards):
    index = ShardIndex.load(tiny_shards)
    cfg = DataConfig(image_size=16, channels=1, mean=(0.5,), std=(0.25,))
    from specialists.errors import DataError

    with pytest.raises(DataError, match="outside 0..11"):
        EnrichedStream(index, cfg, [3, 12], special_fraction=0.5, batch_size=8, seed=0)
    with pytest.raises(DataError, match="nothing is left for the dustbin"):
        EnrichedStream(index, cfg, list(range(12)), special_fraction=0.5, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="special_fraction=1.0"):
        EnrichedStream(index, cfg, [1, 2], special_fraction=1.0, batch_size=8, seed=0)


# --- the stage ------------------------------------------------------------------------------


def _run_dir_with_generalist(tiny_generalist: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_generalist / "generalist", run / "generalist")
    return run


def test_train_specialists_stage(tiny_shards, tiny_generalist, tmp_path, cli):
    run = _run_dir_with_generalist(tiny_generalist, tmp_path)
    names = ShardIndex.load(tiny_shards).class_names
    write_clusters(run, names, GROUPS[:2])
    args = ["--config", ROOT / "configs/tiny.yaml", *sum((["--set", o] for o in tiny_overrides(tiny_shards, run)), [])]
    code, out, err = cli("train-specialists", *args)
    assert code == 0, err
    layout = RunLayout(run)
    gen = read_card(layout.generalist)
    for m, classes in enumerate(GROUPS[:2]):
        model, card = load_model(layout.specialist(m))
        head = card.specialist
        assert head.classes == classes and card.num_outputs == len(classes) + 1
        assert card.source_generalist == gen.sha256
        assert head.special_fraction_in_data == pytest.approx(1 / 3)
        assert head.prior_bias == pytest.approx(dustbin_bias(1 / 3, 0.5))
        assert 0 <= card.training["val_conditional_accuracy"] <= 1
        assert card.deciding["classes"] == classes and card.deciding["specialists.lr"] == 0.01
        assert not layout.specialist(m).checkpoints.exists()
    # re-running skips finished specialists; a changed deciding key is one line naming it
    stamp = layout.specialist(0).weights.stat().st_mtime_ns
    code, _, _ = cli("train-specialists", *args, "--only", "0")
    assert code == 0 and layout.specialist(0).weights.stat().st_mtime_ns == stamp
    code, _, err = cli("train-specialists", *args, "--only", "0", "--set", "specialists.lr=0.05")
    assert code == 2 and err.count("\n") == 1
    assert "specialist 0 trained with specialists.lr=0.01, the config now says 0.05" in err and "--only 0 --force" in err
    # --refit-bias rewrites the val fits for another top-n and leaves the weights alone
    before = read_card(layout.specialist(0))
    assert before.specialist.routed_top_n == 1
    code, _, err = cli("train-specialists", *args, "--refit-bias", "--set", "inference.top_n=3")
    assert code == 0, err
    after = read_card(layout.specialist(0))
    assert layout.specialist(0).weights.stat().st_mtime_ns == stamp
    assert after.sha256 == before.sha256 and after.specialist.routed_top_n == 3
    assert after.specialist.routed_val_images >= before.specialist.routed_val_images  # top-3 routes more images
    assert after.specialist.fitted_bias == pytest.approx(before.specialist.fitted_bias, abs=1e-6)


def test_routed_fit_lowers_the_dustbin_on_images_routed_to_the_specialist():
    """A specialist asked only about images the generalist places in its set should see its
    dustbin rarely: the routed fit (on those images) gives a lower bias than the fit on all."""
    from specialists.stages.specialists import routed_mask

    torch.manual_seed(0)
    n, classes = 6000, [0, 1]
    labels = torch.randint(0, 10, (n,))
    general = torch.randn(n, 10)
    general[torch.arange(n), labels] += 4.0  # a good generalist
    routed = routed_mask(general, classes, top_n=1)
    assert routed.float().mean() < 0.35 and torch.isin(labels[routed], torch.tensor(classes)).float().mean() > 0.9
    targets = torch.where(labels == 0, 0, torch.where(labels == 1, 1, 2))  # set + dustbin
    spec = torch.randn(n, 3)
    spec[torch.arange(n), targets] += 2.0
    spec[:, 2] -= 1.0  # trained at f = 1/2: dustbin under-predicted on the natural mix
    b_all, _ = fit_bias_and_temperature(spec, targets)
    b_routed, _ = fit_bias_and_temperature(spec[routed], targets[routed])
    assert b_all > 0.5 and b_routed < b_all - 1.0


def _train_group0(tiny_shards, tiny_generalist, tmp_path, *overrides: str):
    """Specialist 0 on GROUPS[0] trained by the stage; (its card, its conditional val accuracy recomputed
    from the saved weights on every val image of the set)."""
    from specialists.stages.specialists import run as train_specialists

    run = _run_dir_with_generalist(tiny_generalist, tmp_path)
    index = ShardIndex.load(tiny_shards)
    write_clusters(run, index.class_names, [GROUPS[0]])
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_overrides(tiny_shards, run, *overrides))
    train_specialists(cfg)
    model, card = load_model(RunLayout(run).specialist(0))
    images, labels = load_split(index, cfg.data, "val")
    mask = torch.isin(labels, torch.tensor(GROUPS[0]))
    with torch.no_grad():
        pred = model(normalize(images[mask], cfg.data))[:, :4].argmax(1)
    return card, (pred == labels[mask]).float().mean().item()


def test_specialist_is_better_than_chance_within_its_set(tiny_shards, tiny_generalist, tmp_path):
    """The conditional val accuracy stored in the sidecar equals one recomputed from the saved weights."""
    card, acc = _train_group0(tiny_shards, tiny_generalist, tmp_path, "specialists.bias=fit")
    assert acc == pytest.approx(card.training["val_conditional_accuracy"], abs=1e-6)
    assert acc > 0.25
    assert card.training["bias_method"] == "fit"


@pytest.mark.parametrize("problem, message", [
    ("names", "class_names differ from the shards' classes.json"),
    ("outside", "class 12 outside 0..11"),
])
def test_bad_clusters_json(tiny_shards, tiny_generalist, tmp_path, cli, problem, message):
    run = _run_dir_with_generalist(tiny_generalist, tmp_path)
    names = ShardIndex.load(tiny_shards).class_names
    if problem == "names":
        write_clusters(run, [n + "x" for n in names], GROUPS[:1])
    else:
        write_clusters(run, names, [[0, 12]])
    args = ["--config", ROOT / "configs/tiny.yaml", *sum((["--set", o] for o in tiny_overrides(tiny_shards, run)), [])]
    code, _, err = cli("train-specialists", *args)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not any(RunLayout(run).specialist(m).weights.exists() for m in range(2))


def test_bad_special_fraction(tiny_shards, tmp_path, cli):
    code, _, err = cli("train-specialists", "--config", ROOT / "configs/tiny.yaml", "--set", "specialists.special_fraction=1.2")
    assert code == 2 and "specialists.special_fraction: expected a value in (0, 1), got 1.2" in err


def _cmd(*args):
    return [sys.executable, "-m", "specialists.cli", *map(str, args)]


def _newest_checkpoint_step(checkpoints: Path) -> int:
    return max((json.loads(p.read_text())["step"] for p in checkpoints.glob("ckpt-*/state.json")), default=0)


def _kill_when_checkpointed(args: list, checkpoints: Path, at_least: int) -> int:
    proc = subprocess.Popen(_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and _newest_checkpoint_step(checkpoints) < at_least and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _newest_checkpoint_step(checkpoints)


def test_kill_and_resume_a_specialist(tiny_shards, tiny_generalist, tmp_path):
    """SIGKILL mid-run, then the same command: the specialist equals an uninterrupted one, weights and card."""
    names = ShardIndex.load(tiny_shards).class_names
    runs = {}
    for label in ("ref", "killed"):
        runs[label] = _run_dir_with_generalist(tiny_generalist, tmp_path / label)
        write_clusters(runs[label], names, [GROUPS[0]])
    sets = ["specialists.steps=120", "specialists.checkpoint_every=10", "specialists.eval_every=25",
            "data.augment=crop"]

    def args(run):
        return ["train-specialists", "--config", ROOT / "configs/tiny.yaml",
                *sum((["--set", o] for o in tiny_overrides(tiny_shards, run, *sets)), [])]

    subprocess.run(_cmd(*args(runs["ref"])), check=True, capture_output=True)
    spec = RunLayout(runs["killed"]).specialist(0)
    saved_step = _kill_when_checkpointed(args(runs["killed"]), spec.checkpoints, 30)
    assert not spec.weights.exists(), "finished before it could be killed"
    assert 30 <= saved_step < 120
    # a changed deciding key stops the resume in one line
    result = subprocess.run(_cmd(*args(runs["killed"]), "--set", "specialists.lr=0.02"), capture_output=True, text=True)
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1, result.stderr
    assert "checkpoints made with specialists.lr=0.01, the config now says 0.02; pass --force" in result.stderr
    result = subprocess.run(_cmd(*args(runs["killed"])), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"at step {saved_step}" in result.stderr
    a, b = (read_card(RunLayout(r).specialist(0)) for r in (runs["ref"], runs["killed"]))
    assert a.sha256 == b.sha256, "the resumed specialist's weights differ from the uninterrupted one's"
    assert a.specialist == b.specialist and a.training["val_history"] == b.training["val_history"]
    assert b.training["steps"] == 120 and not spec.checkpoints.exists()


def test_distributed_specialists_two_processes(tiny_shards, tiny_generalist, tmp_path):
    """2 CPU processes: 4 specialists, two per process (m mod 2 = rank), all saved."""
    run = _run_dir_with_generalist(tiny_generalist, tmp_path)
    write_clusters(run, ShardIndex.load(tiny_shards).class_names, GROUPS)
    sets = tiny_overrides(tiny_shards, run, "specialists.steps=10", "specialists.eval_every=5")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
           str(ROOT / "tests/_distributed_cli.py"), "train-specialists", "--config", str(ROOT / "configs/tiny.yaml"),
           *sum((["--set", o] for o in sets), [])]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                                   "ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for m in range(4):
        card = read_card(RunLayout(run).specialist(m))
        assert card.training["world_size"] == 2
        assert card.training["trained_by_rank"] == m % 2
        assert card.specialist.classes == GROUPS[m]


def test_dustbin_correction_choices():
    from specialists.artifacts.model_card import SpecialistHead
    from specialists.bias import dustbin_correction

    head = SpecialistHead(id=3, classes=[1, 2], head="dustbin", special_fraction=0.5, special_fraction_in_data=0.1,
                          prior_bias=2.2, fitted_bias=1.5, fitted_temperature=0.8, routed_bias=-1.8,
                          routed_temperature=0.95, routed_top_n=1, routed_val_images=70)
    assert dustbin_correction(head, "prior") == (2.2, 1.0)
    assert dustbin_correction(head, "fit") == (1.5, 0.8)
    assert dustbin_correction(head, "routed") == (-1.8, 0.95)
    assert dustbin_correction(head, "none") == (0.0, 1.0)
    with pytest.raises(ValueError, match="choice='trained'"):
        dustbin_correction(head, "trained")  # resolved by the caller from specialists.bias


def test_val_beyond_the_sample_bound(tiny_shards, tiny_generalist, tmp_path, monkeypatch):
    """More val images than held_out.SAMPLE_ROWS: the dustbin row and corrections are fitted on a seeded
    sample of that many, the conditional accuracy still on every val image of the set."""
    import specialists.held_out as held_out

    assert held_out.sample_rows(5, seed=0, limit=8).tolist() == [0, 1, 2, 3, 4]
    picked = held_out.sample_rows(96, seed=0, limit=40)
    assert len(picked) == 40 and torch.equal(picked, picked.sort().values)
    assert torch.equal(picked, held_out.sample_rows(96, seed=0, limit=40))  # seeded
    monkeypatch.setattr(held_out, "SAMPLE_ROWS", 40)
    card, acc = _train_group0(tiny_shards, tiny_generalist, tmp_path, "specialists.steps=10")
    routed = card.specialist.routed_val_images
    assert 0 < routed <= 40 and routed < 96 * 4 / 12  # among the 40 sampled, fewer than the 32 images of the set
    assert card.training["val_conditional_accuracy"] == pytest.approx(acc)
