"""Benchmark of the inference package at JFT scale (Hinton et al. 2015, section 5).

Prints ratios measured in one run:
  (a) EM solve vs one copy of the (B, C) pᵍ tensor (target ≤ 2×), images/s;
  (b) EM solve vs a plain dense numpy EM (target ≥ 100×);
  (c) the top-1 path that never writes the dense q;
  (d) time of the gradient (L-BFGS on logits) solver / EM to reach the same objective;
  (e) the engine with routing vs running every specialist on every image, small CNNs
      (target ≥ 0.95 × the ideal (1 + M) / (1 + mean active)), next to the bound the models
      themselves set, (G + M·S) / (G + a·S) with G, S the generalist's and one specialist's
      time on the whole batch (the ideal assumes G = S; a generalist's classifier is larger),
      and the measured ideal (G + M·S) / (the routed batch's model calls alone: the
      generalist and each active specialist on its own images, timed without the engine),
      which also holds the models' cost per image on small sub-batches (not linear in n).

    .venv/bin/python benchmarks/bench_inference.py [--threads 1] [--skip gradient,engine]

Times are medians of --repeats runs after a warm-up (the numpy EM: of --np-repeats);
the copy, the EM solve and the top-1 path are timed round-robin, so that their ratios
see the same load.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from inference import EnsembleEngine, active_specialists, kl_objective, solve_kl, solve_kl_topk


def best_time(fn, repeats: int) -> float:
    """Median of ``repeats`` timed calls after one warm-up (the machine may be shared:
    the median is steadier than the minimum and does not flatter)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def interleaved_times(fns, repeats: int) -> list[float]:
    """Median time of each function, timed round-robin (one call of each per round)
    so that all of them see the same load on a shared machine."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]


def jft_instance(batch, num_classes, num_spec, set_size, seed):
    """Peaked pᵍ: the true class +9 and five classes of a specialist set holding it +5
    (the confusable classes); specialists see the same logits with noise, and their
    dustbin the log-mass of the classes outside their set. Sets are random (overlapping)."""
    g = torch.Generator().manual_seed(seed)
    sets = [torch.randperm(num_classes, generator=g)[:set_size].sort().values for _ in range(num_spec)]
    table = torch.stack(sets)  # (M, S)
    member = torch.zeros(num_classes, num_spec, dtype=torch.bool)
    member[table, torch.arange(num_spec)[:, None]] = True
    covered = member.any(1).nonzero().squeeze(1)
    true = covered[torch.randint(covered.numel(), (batch,), generator=g)]
    logits = torch.randn(batch, num_classes, generator=g)
    rows = torch.arange(batch)
    logits[rows, true] += 9.0
    own = member[true].float().argmax(1)  # a specialist whose set holds the true class
    confusable = table[own][:, :][rows[:, None], torch.randint(set_size, (batch, 5), generator=g)]
    logits[rows[:, None], confusable] += 5.0
    pg = torch.softmax(logits, 1)
    active = active_specialists(pg, sets)
    ps = []
    for m, s in enumerate(sets):
        sub = logits[active[:, m]]  # compact rows: only the images that activate m
        inside = sub[:, s] + 0.5 * torch.randn(sub.shape[0], set_size, generator=g)
        dust = sub.index_fill(1, s, float("-inf")).logsumexp(1, keepdim=True)
        ps.append(torch.softmax(torch.cat([inside, dust], 1), 1))
    return pg, ps, sets, active


def numpy_dense_em(pg, ps, sets, active, tol, max_iter):
    """Baseline: the same EM on dense (B, C) float64 numpy arrays, objective each step."""
    pg = pg.astype(np.float64)
    q = pg.copy()
    denom = 1.0 + active.sum(1)
    spec = [(np.flatnonzero(active[:, m]), s, p.astype(np.float64)) for m, (s, p) in enumerate(zip(sets, ps, strict=True))]
    with np.errstate(divide="ignore", invalid="ignore"):
        const = np.where(pg > 0, pg * np.log(pg), 0).sum(1)
        for idx, _, p in spec:
            const[idx] += np.where(p > 0, p * np.log(p), 0).sum(1)
    f_prev = None
    for _ in range(max_iter + 1):
        f = const - (pg * np.log(np.maximum(q, 1e-300))).sum(1)
        new = pg.copy()
        for idx, s, p in spec:
            qm = q[idx]
            q_s = qm[:, s]
            rest = np.maximum(qm.sum(1) - q_s.sum(1), 1e-300)
            f[idx] -= (p[:, :-1] * np.log(np.maximum(q_s, 1e-300))).sum(1) + p[:, -1] * np.log(rest)
            ratio = p[:, -1] / rest
            t = qm * ratio[:, None]
            t[:, s] = p[:, :-1]
            new[idx] += t
        if f_prev is not None and np.all(np.abs(f_prev - f) <= tol * np.abs(f)):
            break
        f_prev = f
        q = new / denom[:, None]
    return q


def small_cnn(out: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, out),
    )


def bench_solver(args) -> None:
    pg, ps, sets, active = jft_instance(args.batch, args.classes, args.specialists, args.set_size, 0)
    n_act = active.sum(1).float()
    print(f"JFT scale: B={args.batch} C={args.classes} M={args.specialists}x{args.set_size} "
          f"top-1 routing; mean active {n_act.mean():.2f}, images with none "
          f"{(n_act == 0).float().mean():.1%}, mean max pᵍ {pg.max(1).values.mean():.3f}")
    history = []
    q = solve_kl(pg, ps, sets, active, history=history)
    print(f"EM accepted iterates (tol 1e-7): {len(history) - 1} (SQUAREM cycles of 3 EM steps)")
    t_copy, t_em, t_top1 = interleaved_times([
        lambda: pg.clone(),
        lambda: solve_kl(pg, ps, sets, active),
        lambda: solve_kl_topk(pg, ps, sets, active, k=1),
    ], args.repeats)
    print(f"(a) copy of pᵍ {t_copy * 1e3:.1f} ms; EM solve {t_em * 1e3:.1f} ms = "
          f"{t_em / t_copy:.2f}x copy (target <= 2); {args.batch / t_em:,.0f} images/s")
    print(f"(c) top-1 without dense q {t_top1 * 1e3:.1f} ms = {t_top1 / t_copy:.2f}x copy, "
          f"{t_em / t_top1:.2f}x faster than the dense solve")
    top_v, top_i = solve_kl_topk(pg, ps, sets, active, k=1)
    assert torch.equal(top_i[:, 0], q.argmax(1)), "top-1 path disagrees with dense q"
    args_np = (pg.numpy(), [p.numpy() for p in ps], [s.numpy() for s in sets], active.numpy())
    times = []
    for _ in range(args.np_repeats):
        t0 = time.perf_counter()
        q_np = numpy_dense_em(*args_np, tol=1e-7, max_iter=1000)
        times.append(time.perf_counter() - t0)
    t_np = float(np.median(times))
    f_em = kl_objective(q, pg, ps, sets, active)
    f_np = kl_objective(torch.from_numpy(q_np), pg.double(), ps, sets, active)
    print(f"(b) dense numpy EM {t_np * 1e3:.0f} ms = {t_np / t_em:.0f}x the EM solve (target >= 100); "
          f"max objective difference {float((f_np - f_em).abs().max()):.1e}")
    if "gradient" not in args.skip:
        bench_gradient(args, pg, ps, sets, active)


def bench_gradient(args, pg, ps, sets, active) -> None:
    """(d) on the first --grad-batch images (the dense float64 reference is slow)."""
    b = args.grad_batch
    sub_active = active[:b]
    sub_ps = [p[: int(active[:b, m].sum())] for m, p in enumerate(ps)]
    pg = pg[:b]
    q_em = solve_kl(pg, sub_ps, sets, sub_active)  # float32 pᵍ: solve in float64 below
    pg64 = pg.double()
    ps64 = [p.double() for p in sub_ps]
    t_em = best_time(lambda: solve_kl(pg64, ps64, sets, sub_active), args.repeats)
    f_em = kl_objective(solve_kl(pg64, ps64, sets, sub_active), pg64, ps64, sets, sub_active)
    history = []
    t0 = time.perf_counter()
    solve_kl(pg64, ps64, sets, sub_active, method="gradient", tol=0.0, max_iter=args.grad_iters,
             history=history)
    t_grad = time.perf_counter() - t0
    hist = torch.stack(history)  # (iterations + 1, b)
    gap = ((hist - f_em) / f_em.abs().clamp_min(1e-12)).max(1).values
    reached = (gap <= 1e-6).nonzero()
    iters = len(history) - 1
    if reached.numel():
        it = int(reached[0, 0])
        t_reach = t_grad * it / iters  # iterations cost about the same: pro rata
        print(f"(d) B={b}: gradient (L-BFGS on logits) reaches the EM objective within 1e-6 after "
              f"{it} iterations, ~{t_reach * 1e3:.0f} ms = {t_reach / t_em:.0f}x the EM solve "
              f"({t_em * 1e3:.1f} ms)")
    else:
        print(f"(d) B={b}: gradient not within 1e-6 after {iters} iterations ({t_grad:.1f} s, "
              f"{t_grad / t_em:.0f}x the EM solve); remaining gap {float(gap[-1]):.1e}")
    del q_em


def bench_engine(args) -> None:
    """(e) routing vs every specialist on every image, small CNNs on 28x28 inputs."""
    torch.manual_seed(0)
    c, m_spec, size = args.engine_classes, args.engine_specialists, args.engine_set_size
    g = torch.Generator().manual_seed(1)
    sets = [torch.randperm(c, generator=g)[:size].sort().values for _ in range(m_spec)]
    gen = small_cnn(c)
    with torch.no_grad():  # untrained: make the top-1 depend on the input, not on the bias
        gen[-1].weight.mul_(20.0)
        gen[-1].bias.zero_()
    specs = [small_cnn(size + 1) for _ in range(m_spec)]
    engine = EnsembleEngine(gen, specs, sets, [0.0] * m_spec)
    x = torch.randn(args.engine_batch, 1, 28, 28, generator=g)
    routed = engine.predict(x)
    mean_active = float(routed.active.sum(1).float().mean())
    subs = [(s, x[routed.active[:, m]]) for m, s in enumerate(specs) if bool(routed.active[:, m].any())]

    def models_routed():  # the model calls alone: generalist, each active specialist on its images
        gen(x)
        for s, xs in subs:
            s(xs)

    with torch.inference_mode():
        t_routed, t_all, t_gen, t_spec, t_models = interleaved_times(
            [lambda: engine.predict(x), lambda: engine.predict(x, run_all=True), lambda: gen(x),
             lambda: specs[0](x), models_routed],
            args.repeats)
    ideal = (1 + m_spec) / (1 + mean_active)
    bound = (t_gen + m_spec * t_spec) / (t_gen + mean_active * t_spec)
    measured = (t_gen + m_spec * t_spec) / t_models
    speedup = t_all / t_routed
    same = engine.predict(x, return_q=True).q
    diff = (same - engine.predict(x, return_q=True, run_all=True).q).abs().max()
    print(f"(e) engine B={args.engine_batch} C={c} M={m_spec}x{size}, mean active "
          f"{mean_active:.2f}, {len(subs)} specialists run: routed {t_routed * 1e3:.0f} ms, "
          f"run-all {t_all * 1e3:.0f} ms, speed-up {speedup:.2f}x\n"
          f"    vs (1 + M) / (1 + mean active) = {ideal:.2f}x: {speedup / ideal:.2f} (target >= 0.95; "
          f"assumes every model costs the same per image)\n"
          f"    vs the models' bound (G + M·S) / (G + a·S) = {bound:.2f}x: {speedup / bound:.2f} "
          f"(generalist G {t_gen * 1e3:.0f} ms, a specialist S {t_spec * 1e3:.0f} ms on the batch)\n"
          f"    vs the measured ideal (G + M·S) / (the model calls of the routed batch, "
          f"{t_models * 1e3:.0f} ms) = {measured:.2f}x: {speedup / measured:.2f}; the engine's own "
          f"cost: routed / model calls = {t_routed / t_models:.3f}, run-all / (G + M·S) = "
          f"{t_all / (t_gen + m_spec * t_spec):.3f}; max |q diff| {diff:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=15000)
    ap.add_argument("--specialists", type=int, default=61)
    ap.add_argument("--set-size", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--grad-batch", type=int, default=64)
    ap.add_argument("--grad-iters", type=int, default=600)
    ap.add_argument("--engine-batch", type=int, default=256)
    ap.add_argument("--engine-classes", type=int, default=1000)
    ap.add_argument("--engine-specialists", type=int, default=61)
    ap.add_argument("--engine-set-size", type=int, default=20)
    ap.add_argument("--np-repeats", type=int, default=1, help="runs of the dense numpy EM (median)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: solver,gradient,engine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    if "solver" not in args.skip:
        bench_solver(args)
    if "engine" not in args.skip:
        bench_engine(args)


if __name__ == "__main__":
    main()
