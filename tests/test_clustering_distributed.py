"""CovarianceAccumulator.all_reduce across 2 gloo processes (CPU)."""

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clustering import CovarianceAccumulator
from clustering.features import accumulated_features, column_features


def _data() -> np.ndarray:
    x = np.random.default_rng(0).random((90, 8))
    return x / x.sum(axis=1, keepdims=True)


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        x = _data()
        shard = x[:37] if rank == 0 else x[37:]  # uneven shards
        acc = CovarianceAccumulator(8, top_k=None).update(shard)
        acc.all_reduce()
        top = CovarianceAccumulator(8, top_k=3).update(shard).all_reduce()  # the kept rows are gathered
        torch.save(
            {"world_size": dist.get_world_size(), "count": acc.count, "cov": acc.covariance(),
             "rows": sum(len(v) for v in top.rows[0]),
             "features": torch.from_numpy(accumulated_features(top, max_dim=4))},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_all_reduce_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = CovarianceAccumulator(8).update(_data()).covariance()
    top_single = CovarianceAccumulator(8, top_k=3).update(_data()).covariance()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["world_size"] == 2
        assert result["count"] == 90 and result["rows"] == 90
        np.testing.assert_allclose(result["features"].numpy(), column_features(top_single, max_dim=4), atol=1e-5)
        np.testing.assert_allclose(result["cov"].numpy(), single.numpy(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(single.numpy(), np.cov(_data(), rowvar=False, bias=True), atol=1e-12)


def test_all_reduce_without_process_group_is_a_no_op():
    acc = CovarianceAccumulator(8).update(_data())
    before = acc.covariance()
    assert torch.equal(acc.all_reduce().covariance(), before)
