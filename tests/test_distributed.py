"""A shaped model trains under DistributedDataParallel: gloo, 2 processes on CPU.

Each rank shapes the same model (DKS, seed 0), wraps it in DDP, and takes a few SGD steps
on its own data shard. DDP averages the gradients, so afterwards both ranks must hold
identical parameters, different from the initial ones, with a finite loss.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
STEPS = 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank: int, port: int, folder: str) -> None:
    import graphshape

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        shaped = graphshape.shape(_small_cnn(), torch.randn(2, 3, 8, 8), method="DKS", seed=0)
        initial = _flat_params(shaped).clone()
        model = torch.nn.parallel.DistributedDataParallel(shaped)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        data = torch.Generator().manual_seed(100 + rank)  # a different shard per rank
        losses = []
        for _ in range(STEPS):
            x = torch.randn(4, 3, 8, 8, generator=data)
            y = torch.randint(0, 4, (4,), generator=data)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        torch.save({"initial": initial, "final": _flat_params(model.module), "losses": losses},
                   f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_shaped_model_trains_under_ddp_with_identical_parameters(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    # the shaping and initialization are deterministic: both ranks start alike
    assert torch.equal(results[0]["initial"], results[1]["initial"])
    # each rank saw other data, yet gradient averaging keeps the parameters identical
    assert results[0]["losses"] != results[1]["losses"]
    assert torch.equal(results[0]["final"], results[1]["final"])
    # and training moved them
    assert not torch.allclose(results[0]["final"], results[0]["initial"])
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in results)
