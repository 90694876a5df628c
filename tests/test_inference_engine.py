"""Routing against a brute-force loop; the engine against solve_kl and run-everything."""

import pytest
import torch
from torch import nn

from inference import EnsembleEngine, active_specialists, solve_kl


def brute_force_active(p_general, class_sets, top_n):
    batch = p_general.shape[0]
    active = torch.zeros(batch, len(class_sets), dtype=torch.bool)
    for b in range(batch):
        top = set(torch.topk(p_general[b], top_n).indices.tolist())
        for m, s in enumerate(class_sets):
            active[b, m] = bool(top & set(int(c) for c in s))
    return active


@pytest.mark.parametrize("top_n", [1, 2, 5])
def test_routing_matches_brute_force(top_n):
    g = torch.Generator().manual_seed(top_n)
    pg = torch.softmax(torch.randn(50, 40, generator=g), 1)
    sets = [torch.randperm(40, generator=g)[: int(torch.randint(1, 12, (1,), generator=g))]
            for _ in range(9)]
    active = active_specialists(pg, sets, top_n=top_n)
    assert active.dtype == torch.bool and active.shape == (50, 9)
    assert torch.equal(active, brute_force_active(pg, sets, top_n))


def test_routing_top1_examples():
    pg = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    sets = [[1], [0, 2], [2]]
    active = active_specialists(pg, sets)
    assert active.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_routing_errors():
    pg = torch.softmax(torch.randn(4, 6), 1)
    with pytest.raises(ValueError, match=r"top_n must be an int in \[1, C=6\]"):
        active_specialists(pg, [[0]], top_n=7)
    with pytest.raises(ValueError, match=r"class_sets\[1\] holds class 6"):
        active_specialists(pg, [[0], [6]])
    with pytest.raises(ValueError, match="p_general must be a \\(B, C\\)"):
        active_specialists(pg[0], [[0]])


# ----------------------------------------------------------------------------- engine


def tiny_cnn(out, seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(4),
        nn.Flatten(), nn.Linear(4 * 4 * 4, out),
    )


NUM_CLASSES = 12
SETS = [[0, 1, 2, 3], [2, 3, 4, 5, 6], [7, 8, 9], [9, 10, 11, 0]]
BIASES = [0.5, -0.3, 1.2, 0.0]
TEMPS = [1.0, 2.0, 0.5, 1.5]


def make_engine(**kw):
    gen = tiny_cnn(NUM_CLASSES, 0)
    gen[-1].bias.data = torch.linspace(-2, 2, NUM_CLASSES)  # spread the top-1 over classes
    specs = [tiny_cnn(len(s) + 1, 10 + m) for m, s in enumerate(SETS)]
    return EnsembleEngine(gen, specs, SETS, BIASES, temperatures=TEMPS, **kw)


def images(n=40, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_routed_engine_matches_run_everything_and_manual_solve():
    engine = make_engine()
    x = images()
    routed = engine.predict(x, return_q=True, top_k=3)
    everything = engine.predict(x, return_q=True, top_k=3, run_all=True)
    assert torch.equal(routed.active, everything.active)
    torch.testing.assert_close(routed.q, everything.q, rtol=0, atol=1e-6)
    # by hand: generalist probs, routing, every specialist on every image, solve
    with torch.no_grad():
        pg = torch.softmax(engine.generalist(x), 1)
        ps = []
        for m, spec in enumerate(engine.specialists):
            z = spec(x) / TEMPS[m]
            z[:, -1] += BIASES[m]
            ps.append(torch.softmax(z, 1))
    active = active_specialists(pg, SETS)
    assert torch.equal(active, routed.active)
    assert 0 < active.sum() < active.numel()  # the case is not trivial
    torch.testing.assert_close(routed.q, solve_kl(pg, ps, SETS, active), rtol=0, atol=1e-6)
    torch.testing.assert_close(routed.p_general, pg, rtol=0, atol=1e-6)
    # top-1 / top-k without dense q agree with the dense q
    light = engine.predict(x, top_k=3)
    assert light.q is None and light.p_general is None
    assert torch.equal(light.top1, routed.q.argmax(1))
    torch.testing.assert_close(light.top1_prob, routed.q.max(1).values, rtol=0, atol=1e-6)
    torch.testing.assert_close(light.topk_probs, routed.topk_probs, rtol=0, atol=1e-6)
    assert torch.equal(light.general_top1, pg.argmax(1))


def test_engine_built_under_inference_mode_predicts_the_same():
    """Set tensors made under torch.inference_mode carry no version counter: built there, it still works."""
    x = images()
    expected = make_engine().predict(x, return_q=True).q
    with torch.inference_mode():
        engine = make_engine()
        first, again = engine.predict(x, return_q=True).q, engine.predict(x, return_q=True).q
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
    assert torch.equal(first, again)


def test_engine_runs_each_specialist_once_on_its_images():
    engine = make_engine()
    seen = {}
    for m, spec in enumerate(engine.specialists):
        spec.register_forward_hook(lambda mod, inp, out, m=m: seen.setdefault(m, []).append(inp[0].shape[0]))
    result = engine.predict(images())
    for m in range(len(SETS)):
        n_m = int(result.active[:, m].sum())
        assert seen.get(m, []) == ([n_m] if n_m else [])


def test_engine_gradient_method_agrees_with_em():
    x = images(12)
    em = make_engine().predict(x, return_q=True)
    gd = make_engine(method="gradient", tol=1e-12, max_iter=500).predict(x, return_q=True)
    torch.testing.assert_close(gd.q, em.q, rtol=0, atol=1e-4)


def test_engine_puts_models_in_eval_mode_and_checks_outputs():
    engine = make_engine()
    assert not engine.generalist.training and not any(s.training for s in engine.specialists)
    bad = EnsembleEngine(tiny_cnn(NUM_CLASSES, 0), [tiny_cnn(3, 1)], [[0, 1, 2]], [0.0])
    with pytest.raises(ValueError, match=r"specialist 0 returned logits of shape \(4, 3\), expected \(4, \|class_sets\[0\]\| \+ 1 = 4\)"):
        bad.predict(images(4), run_all=True)
    with pytest.raises(ValueError, match="dustbin_biases has 1 values, expected one per specialist"):
        EnsembleEngine(tiny_cnn(NUM_CLASSES, 0), [tiny_cnn(5, 1)] * 2, SETS[:2], [0.0])
    with pytest.raises(ValueError, match="temperatures must be 2 positive numbers"):
        EnsembleEngine(tiny_cnn(NUM_CLASSES, 0), [tiny_cnn(5, 1)] * 2, SETS[:2], [0.0, 0.0],
                       temperatures=[1.0, 0.0])
