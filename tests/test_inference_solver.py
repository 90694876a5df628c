"""KL solvers: EM vs gradient reference, closed forms, edge cases, input checks."""

import pytest
import torch

from inference import active_specialists, kl_objective, solve_kl, solve_kl_topk


def random_instance(batch, num_classes, num_spec, set_size, *, dtype=torch.float64, seed=0,
                    sharp=2.0, p_active=0.4):
    """Random pᵍ, overlapping sets, full-B specialist rows; image 0 has no active specialist."""
    g = torch.Generator().manual_seed(seed)
    pg = torch.softmax(sharp * torch.randn(batch, num_classes, generator=g, dtype=torch.float64), 1)
    sets = [torch.randperm(num_classes, generator=g)[:set_size].sort().values for _ in range(num_spec)]
    active = torch.rand(batch, num_spec, generator=g) < p_active
    active[0] = False
    active[1, :2] = True  # at least one image with two (possibly overlapping) specialists
    ps = [torch.softmax(sharp * torch.randn(batch, set_size + 1, generator=g, dtype=torch.float64), 1)
          for _ in sets]
    return pg.to(dtype), [p.to(dtype) for p in ps], sets, active


@pytest.mark.parametrize("num_classes,set_size,sharp", [(10, 4, 2.0), (1000, 60, 1.0)])
def test_em_matches_gradient_reference(num_classes, set_size, sharp):
    # the logit-space reference converges slowly on peaked pᵍ (curvature ∝ q_j), hence
    # the milder pᵍ at C = 1000 to keep the test fast
    pg, ps, sets, active = random_instance(6, num_classes, 5, set_size, seed=num_classes,
                                           sharp=sharp)
    q_em = solve_kl(pg, ps, sets, active, method="em", tol=0.0)
    q_gd = solve_kl(pg, ps, sets, active, method="gradient", tol=1e-10, max_iter=1000)
    f_em = kl_objective(q_em, pg, ps, sets, active)
    f_gd = kl_objective(q_gd, pg, ps, sets, active)
    rel = (f_gd - f_em) / f_em.clamp_min(1e-12)
    assert rel.abs().max() < 1e-6, rel
    assert f_em[0] == 0 and f_gd[0] == 0  # no active specialist: q = pᵍ
    torch.testing.assert_close(q_em, q_gd, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_em_objective_is_monotone_and_matches_dense_objective(dtype):
    # float32: pᵍ rows sum to 1 only within rounding; the start must be on the simplex
    pg, ps, sets, active = random_instance(12, 50, 6, 12, seed=3, sharp=3.0, dtype=dtype)
    history = []
    q = solve_kl(pg, ps, sets, active, tol=0.0, max_iter=60, history=history)
    f = torch.stack(history)  # (iterations, B)
    assert f.shape[0] >= 5
    assert (f[1:] - f[:-1] <= 1e-12 * f[:-1].abs().clamp_min(1)).all()
    if dtype == torch.float64:
        torch.testing.assert_close(f[-1], kl_objective(q, pg, ps, sets, active), rtol=1e-12,
                                   atol=1e-12)


def dense_em(pg, ps, sets, active, iters):
    """Independent reference: the DESIGN.md EM on dense (B, C) float64 q, plain steps."""
    q = pg.double().clone()
    denom = 1.0 + active.sum(1, keepdim=True).double()
    for _ in range(iters):
        new = pg.double().clone()
        for m, (s, p) in enumerate(zip(sets, ps, strict=True)):
            idx = active[:, m].nonzero().squeeze(1)
            p = p.double()[idx] if p.shape[0] == pg.shape[0] else p.double()
            qm = q[idx]
            rest = qm.sum(1) - qm[:, s].sum(1)
            t = qm * (p[:, -1] / rest)[:, None]
            t[:, s] = p[:, :-1]
            new[idx] += t
        q = new / denom
    return q


def heavy_overlap_instance(seed=23):
    """Many active specialists per image over few classes: many sharing patterns,
    classes in up to all sets, a class in no set."""
    g = torch.Generator().manual_seed(seed)
    batch, num_classes, num_spec, set_size = 10, 24, 7, 9
    pg = torch.softmax(2 * torch.randn(batch, num_classes, generator=g, dtype=torch.float64), 1)
    sets = [torch.randperm(num_classes - 1, generator=g)[:set_size].sort().values
            for _ in range(num_spec)]
    sets[0] = torch.cat([sets[0][sets[0] != 5], torch.tensor([5])]).sort().values
    for s_i in sets[1:]:  # class 5 in every set
        if 5 not in s_i:
            s_i[0] = 5
    sets = [s_i.unique() for s_i in sets]
    active = torch.rand(batch, num_spec, generator=g) < 0.7
    active[0] = False
    active[1] = True
    ps = [torch.softmax(2 * torch.randn(batch, s_i.numel() + 1, generator=g, dtype=torch.float64), 1)
          for s_i in sets]
    return pg, ps, sets, active


def test_node_em_matches_dense_em_with_heavy_overlaps():
    pg, ps, sets, active = heavy_overlap_instance()
    q = solve_kl(pg, ps, sets, active, tol=0.0, max_iter=3000)
    q_ref = dense_em(pg, ps, sets, active, 1500)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-9)
    q_gd = solve_kl(pg, ps, sets, active, method="gradient", tol=1e-12, max_iter=150)
    f, f_gd = kl_objective(q, pg, ps, sets, active), kl_objective(q_gd, pg, ps, sets, active)
    assert ((f_gd - f) / f.clamp_min(1e-12) >= -1e-9).all()  # EM is never worse


@pytest.mark.parametrize("num_spec,set_size,num_classes", [(70, 12, 60), (130, 5, 40)])
def test_node_em_matches_dense_em_beyond_one_bit_word(num_spec, set_size, num_classes):
    # more than 63 specialists: membership bits span 2 and 3 int64 words
    pg, ps, sets, active = random_instance(20, num_classes, num_spec, set_size, seed=num_spec,
                                           p_active=0.2)
    active[2, 60:70] = True  # specialists on both sides of the word boundary
    active[3, ::7] = True
    from inference._sets import check_class_sets
    from inference.em import densify, solve_em

    table = check_class_sets(sets, pg.shape[1], pg.device)
    rows = ps_rows(ps, active)
    q0 = densify(solve_em(pg, table, active, rows, pg.sum(1), tol=0.0, max_iter=0), pg)
    sol = solve_em(pg, table, active, rows, pg.sum(1), tol=0.0, max_iter=3, accelerate=False)
    q_ref = dense_em_from(q0, pg, ps, sets, active, 3)
    torch.testing.assert_close(densify(sol, pg), q_ref, rtol=0, atol=1e-13)
    q = solve_kl(pg, ps, sets, active, tol=0.0)
    vals, _ = solve_kl_topk(pg, ps, sets, active, k=3, tol=0.0)
    torch.testing.assert_close(vals, q.topk(3, dim=1).values, rtol=0, atol=1e-14)


def test_first_plain_em_steps_match_dense_em():
    # the node EM started where the dense EM is (q ∝ w on each pattern) takes the same steps
    pg, ps, sets, active = heavy_overlap_instance(seed=5)
    from inference._sets import check_class_sets
    from inference.em import densify, solve_em

    table = check_class_sets(sets, pg.shape[1], pg.device)
    q0 = solve_em(pg, table, active, ps_rows(ps, active), pg.sum(1), tol=0.0, max_iter=0)
    for steps in (1, 2, 5):
        sol = solve_em(pg, table, active, ps_rows(ps, active), pg.sum(1), tol=0.0,
                       max_iter=steps, accelerate=False)
        q_ref = dense_em_from(densify(q0, pg), pg, ps, sets, active, steps)
        torch.testing.assert_close(densify(sol, pg), q_ref, rtol=0, atol=1e-13)


def ps_rows(ps, active):
    return [p[active[:, m]] for m, p in enumerate(ps)]


def dense_em_from(q, pg, ps, sets, active, iters):
    denom = 1.0 + active.sum(1, keepdim=True).double()
    for _ in range(iters):
        new = pg.clone()
        for m, (s, p) in enumerate(zip(sets, ps, strict=True)):
            idx = active[:, m].nonzero().squeeze(1)
            qm, p = q[idx], p[idx]
            t = qm * (p[:, -1] / (qm.sum(1) - qm[:, s].sum(1)))[:, None]
            t[:, s] = p[:, :-1]
            new[idx] += t
        q = new / denom
    return q


@pytest.mark.parametrize("seed", [3, 23])
def test_accelerated_and_plain_em_reach_the_same_objective_monotonically(seed):
    from inference._sets import check_class_sets
    from inference.em import densify, solve_em

    pg, ps, sets, active = (heavy_overlap_instance(seed) if seed == 23 else
                            random_instance(40, 300, 9, 40, seed=seed, sharp=3.0, p_active=0.5))
    table = check_class_sets(sets, pg.shape[1], pg.device)
    rows = ps_rows(ps, active)
    runs = {}
    for accelerate in (True, False):
        history = []
        sol = solve_em(pg, table, active, rows, pg.sum(1), tol=1e-12, max_iter=5000,
                       history=history, accelerate=accelerate)
        f = torch.stack(history)
        assert (f[1:] - f[:-1] <= 1e-12 * f[:-1].abs().clamp_min(1)).all()
        runs[accelerate] = (len(history), kl_objective(densify(sol, pg), pg, ps, sets, active))
    (n_fast, f_fast), (n_plain, f_plain) = runs[True], runs[False]
    torch.testing.assert_close(f_fast, f_plain, rtol=1e-9, atol=1e-12)
    assert 3 * (n_fast - 1) < n_plain - 1  # fewer EM steps (3 per accepted cycle)


def test_full_distributions_give_the_arithmetic_mean():
    # every specialist covers all classes with an empty dustbin: the optimum is the mean
    g = torch.Generator().manual_seed(1)
    batch, num_classes, num_spec = 5, 7, 3
    pg = torch.softmax(torch.randn(batch, num_classes, generator=g, dtype=torch.float64), 1)
    full = [torch.softmax(torch.randn(batch, num_classes, generator=g, dtype=torch.float64), 1)
            for _ in range(num_spec)]
    ps = [torch.cat([p, torch.zeros(batch, 1, dtype=torch.float64)], 1) for p in full]
    sets = [list(range(num_classes))] * num_spec
    active = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    q = solve_kl(pg, ps, sets, active)
    stack = torch.stack([pg] + full)  # (1 + M, B, C)
    weights = torch.cat([torch.ones(batch, 1), active.double()], 1).T[:, :, None]
    expected = (stack * weights).sum(0) / weights.sum(0)
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-15)


def test_one_specialist_with_dustbin_closed_form():
    # KKT: q_j = (pᵍ_j + pᵐ_j)/2 on S, q_j = pᵍ_j (G + d)/(2G) outside (G = pᵍ mass outside S)
    g = torch.Generator().manual_seed(2)
    batch, num_classes = 4, 20
    cls = torch.tensor([2, 5, 11, 17])
    pg = torch.softmax(torch.randn(batch, num_classes, generator=g, dtype=torch.float64), 1)
    pm = torch.softmax(torch.randn(batch, 5, generator=g, dtype=torch.float64), 1)
    active = torch.ones(batch, 1, dtype=torch.bool)
    q = solve_kl(pg, [pm], [cls], active, tol=1e-15)
    outside = torch.ones(num_classes, dtype=torch.bool)
    outside[cls] = False
    big_g = pg[:, outside].sum(1, keepdim=True)
    expected = pg * (big_g + pm[:, -1:]) / (2 * big_g)
    expected[:, cls] = (pg[:, cls] + pm[:, :-1]) / 2
    torch.testing.assert_close(q, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["em", "gradient"])
def test_no_active_specialist_returns_p_general_exactly(dtype, method):
    pg, ps, sets, active = random_instance(4, 30, 3, 5, dtype=dtype)
    active[:] = False
    q = solve_kl(pg, ps, sets, active, method=method)
    assert q.dtype == dtype
    assert torch.equal(q, pg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_sum_to_one_and_dtype_kept(dtype):
    pg, ps, sets, active = random_instance(16, 200, 8, 30, dtype=dtype, seed=5)
    q = solve_kl(pg, ps, sets, active)
    assert q.dtype == dtype and q.shape == pg.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(q.sum(1, dtype=torch.float64), torch.ones(16, dtype=torch.float64),
                               rtol=0, atol=tol)
    assert torch.equal(q[0], pg[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["em", "gradient"])
def test_zeros_and_tiny_dustbins_are_safe(dtype, method):
    pg, ps, sets, active = random_instance(8, 40, 4, 6, dtype=dtype, seed=7, sharp=4.0)
    pg[:, ::3] = 0.0  # zero generalist probabilities, some inside the sets
    pg = pg / pg.sum(1, keepdim=True)
    ps[0][:, -1] = 1e-30  # tiny dustbin
    ps[0] = ps[0] / ps[0].sum(1, keepdim=True)
    ps[1][:, :3] = 0.0  # zeros inside a specialist's set
    ps[1][:, -1] = 0.0  # and an empty dustbin
    ps[1] = ps[1] / ps[1].sum(1, keepdim=True)
    active[:, :2] = True
    active[0] = False
    q = solve_kl(pg, ps, sets, active, method=method, max_iter=100)
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(1).double(), torch.ones(8, dtype=torch.float64), rtol=0,
                               atol=1e-5)
    f = kl_objective(q, pg, ps, sets, active)
    assert torch.isfinite(f).all()


def test_em_float32_matches_float64():
    pg, ps, sets, active = random_instance(10, 300, 6, 40, seed=9)
    q64 = solve_kl(pg, ps, sets, active)
    q32 = solve_kl(pg.float(), [p.float() for p in ps], sets, active)
    torch.testing.assert_close(q32.double(), q64, rtol=0, atol=1e-6)


def test_compact_rows_equal_full_rows():
    pg, ps, sets, active = random_instance(20, 100, 7, 15, seed=11)
    compact = [p[active[:, m]] for m, p in enumerate(ps)]
    garbage = [p.clone() for p in ps]
    for m, p in enumerate(garbage):
        p[~active[:, m]] = float("nan")  # rows of inactive images must never be read
    q_full = solve_kl(pg, ps, sets, active)
    assert torch.equal(solve_kl(pg, compact, sets, active), q_full)
    assert torch.equal(solve_kl(pg, garbage, sets, active), q_full)
    mixed = [compact[m] if m % 2 else ps[m] for m in range(len(ps))]
    assert torch.equal(solve_kl(pg, mixed, sets, active), q_full)


def test_sets_as_lists_and_unsorted_indices():
    pg, ps, sets, active = random_instance(6, 30, 3, 5, seed=13)
    q = solve_kl(pg, ps, sets, active)
    as_lists = [s.tolist() for s in sets]
    assert torch.equal(solve_kl(pg, ps, as_lists, active), q)


@pytest.mark.parametrize("k", [1, 3, 25])
def test_topk_without_dense_q_matches_dense(k):
    pg, ps, sets, active = random_instance(32, 60, 8, 9, seed=17, sharp=3.0, p_active=0.3)
    q = solve_kl(pg, ps, sets, active)
    vals, idx = solve_kl_topk(pg, ps, sets, active, k=k)
    ref_vals, _ = q.topk(k, dim=1)
    torch.testing.assert_close(vals, ref_vals, rtol=0, atol=1e-14)
    torch.testing.assert_close(q.gather(1, idx), ref_vals, rtol=0, atol=1e-14)


def test_topk_when_generalist_top_classes_all_lie_in_u():
    # the generalist's 20 best classes all belong to the active set: the fallback path
    batch, num_classes = 3, 200
    logits = torch.zeros(batch, num_classes, dtype=torch.float64)
    logits[:, :20] = 5.0 - 0.1 * torch.arange(20)
    pg = torch.softmax(logits, 1)
    sets = [torch.arange(25)]
    pm = torch.softmax(torch.zeros(batch, 26, dtype=torch.float64), 1)
    active = torch.ones(batch, 1, dtype=torch.bool)
    q = solve_kl(pg, [pm], sets, active)
    vals, idx = solve_kl_topk(pg, [pm], sets, active, k=30)
    torch.testing.assert_close(vals, q.topk(30, dim=1).values, rtol=0, atol=1e-14)
    assert torch.equal(torch.sort(idx[:, 25:]).values, torch.sort(q.topk(30, 1).indices[:, 25:]).values)


def test_topk_outside_u_winners_buffer_chunks_and_small_u():
    # C = 50,000: the masked pᵍ buffer holds 10 rows, so the 13-18 rows looked at take two
    # chunks; some rows have a class outside U that beats every U class, some have k > |U|,
    # some no active specialist
    batch, num_classes = 64, 50_000
    pg, ps, sets, active = random_instance(batch, num_classes, 6, 8, seed=31, sharp=1.0,
                                           p_active=0.5)
    outside = torch.ones(num_classes, dtype=torch.bool)
    outside[torch.cat(sets)] = False
    big = outside.nonzero()[:3, 0]
    logits = pg.log()
    logits[::3, big[0]] += 12.0  # dominant class outside every set
    logits[1::5, big[1:]] += 6.0
    pg = torch.softmax(logits, 1)
    active[5:9] = False
    q = solve_kl(pg, ps, sets, active)
    for k in (1, 4, 12):
        vals, idx = solve_kl_topk(pg, ps, sets, active, k=k)
        ref = q.topk(k, dim=1).values
        torch.testing.assert_close(vals, ref, rtol=0, atol=1e-14)
        torch.testing.assert_close(q.gather(1, idx), ref, rtol=0, atol=1e-14)


def test_set_table_memo_sees_changes_to_the_sets():
    pg, ps, sets, active = random_instance(8, 40, 3, 6, seed=19)
    sets = [s.clone() for s in sets]
    q1 = solve_kl(pg, ps, sets, active)
    assert torch.equal(solve_kl(pg, ps, sets, active), q1)  # memoised table, same result
    free = [c for c in range(40) if c not in sets[1].tolist()][0]
    sets[1][0] = free  # in place: the tensor's version changes
    sets[1] = sets[1].sort().values
    fresh = [s.clone() for s in sets]
    torch.testing.assert_close(solve_kl(pg, ps, sets, active), solve_kl(pg, ps, fresh, active),
                               rtol=0, atol=0)
    sets[2] = torch.arange(6)  # element replaced
    torch.testing.assert_close(solve_kl(pg, ps, sets, active),
                               solve_kl(pg, ps, [s.clone() for s in sets], active), rtol=0, atol=0)
    sets[0].copy_(torch.arange(10, 16))  # in place without replacing
    torch.testing.assert_close(solve_kl(pg, ps, sets, active),
                               solve_kl(pg, ps, [s.clone() for s in sets], active), rtol=0, atol=0)


def test_overlapping_sets_shared_classes():
    # two identical active sets must act like one specialist counted twice
    g = torch.Generator().manual_seed(4)
    pg = torch.softmax(torch.randn(3, 12, generator=g, dtype=torch.float64), 1)
    pm = torch.softmax(torch.randn(3, 5, generator=g, dtype=torch.float64), 1)
    cls = [1, 4, 7, 9]
    active = torch.ones(3, 2, dtype=torch.bool)
    q_twice = solve_kl(pg, [pm, pm], [cls, cls], active, tol=0)
    q_ref = solve_kl(pg, [pm, pm], [cls, cls], active, method="gradient", tol=0, max_iter=1000)
    f = kl_objective(q_twice, pg, [pm, pm], [cls, cls], active)
    f_ref = kl_objective(q_ref, pg, [pm, pm], [cls, cls], active)
    assert ((f_ref - f) / f).abs().max() < 1e-6


def test_active_from_routing_end_to_end():
    pg, ps, sets, _ = random_instance(30, 80, 9, 20, seed=21, sharp=3.0)
    active = active_specialists(pg, sets, top_n=2)
    q = solve_kl(pg, ps, sets, active)
    torch.testing.assert_close(q.sum(1), torch.ones(30, dtype=torch.float64), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_bad_value():
    pg, ps, sets, active = random_instance(4, 20, 3, 5)
    with pytest.raises(ValueError, match=r"p_specialists\[1\] has 7 columns, expected \|class_sets\[1\]\| \+ 1 = 6"):
        solve_kl(pg, [ps[0], torch.rand(4, 7, dtype=torch.float64), ps[2]], sets, active)
    with pytest.raises(ValueError, match=r"p_specialists\[0\] has 3 rows, expected B = 4"):
        solve_kl(pg, [ps[0][:3], ps[1], ps[2]], sets, active)
    with pytest.raises(ValueError, match=r"active has shape \(4, 2\), expected \(B, M\) = \(4, 3\)"):
        solve_kl(pg, ps, sets, active[:, :2])
    with pytest.raises(ValueError, match="active must be a .* bool tensor"):
        solve_kl(pg, ps, sets, active.long())
    with pytest.raises(ValueError, match=r"p_specialists must be a list of M = 3 tensors, got 2"):
        solve_kl(pg, ps[:2], sets, active)
    with pytest.raises(ValueError, match=r"class_sets\[2\] holds class 20, expected indices in \[0, 20\)"):
        solve_kl(pg, ps, [sets[0], sets[1], [1, 2, 3, 4, 20]], active)
    with pytest.raises(ValueError, match=r"class_sets\[0\] lists a class more than once"):
        solve_kl(pg, ps, [[1, 1, 2, 3, 4], sets[1], sets[2]], active)
    with pytest.raises(ValueError, match="p_general must be a \\(B, C\\)"):
        solve_kl(pg[0], ps, sets, active)
    with pytest.raises(ValueError, match="rows of p_general must be probability distributions"):
        solve_kl(pg * 2, ps, sets, active)
    with pytest.raises(ValueError, match="method must be one of"):
        solve_kl(pg, ps, sets, active, method="newton")
    with pytest.raises(ValueError, match="tol must be a number >= 0"):
        solve_kl(pg, ps, sets, active, tol=-1)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, C=20\]"):
        solve_kl_topk(pg, ps, sets, active, k=21)
    with pytest.raises(ValueError, match="q must be a tensor shaped like p_general"):
        kl_objective(pg[:2], pg, ps, sets, active)


def test_em_helpers_match_plain_torch():
    # the CPU fast paths of the EM setup against the plain torch they replace
    from inference.em import _dense_ids, _row_sums64, _take, _unique

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 11, generator=g)
    rows, cols = torch.randint(0, 7, (50,), generator=g), torch.randint(0, 10, (50,), generator=g)
    assert torch.equal(_take(x, rows, cols), x[rows, cols])
    view = x[:, :-1]  # row-strided: read in place
    assert torch.equal(_take(view, rows, cols), view[rows, cols])
    bits = torch.randint(0, 99, (5, 6, 2), generator=g)
    r3, c3 = torch.randint(0, 5, (30,), generator=g), torch.randint(0, 6, (30,), generator=g)
    assert torch.equal(_take(bits, r3, c3), bits[r3, c3])
    swapped = bits.transpose(0, 1)  # not row-major: the advanced index
    assert torch.equal(_take(swapped, c3, r3), swapped[c3, r3])
    key = torch.randint(0, 40, (300,), generator=g)
    uniq, inverse = torch.unique(key, return_inverse=True)
    ids, n = _dense_ids(key)
    assert n == uniq.numel() and torch.equal(ids, inverse) and ids.dtype == torch.long
    assert torch.equal(_unique(key), uniq)
    assert _dense_ids(key[:0])[1] == 0
    big = torch.rand(300, 301, generator=g)  # several pieces of rows
    assert torch.equal(_row_sums64(big), big.sum(1, dtype=torch.float64))
