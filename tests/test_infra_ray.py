"""Ray through `infra.ray_cluster`, and the per-stage resource table.

One local Ray for the module (~3-4 s to start on 2 cores, ~0.9 GiB). The driver runs
from a directory outside the repo, so workers importing `infra` proves that the repo
root reaches them through the runtime env, not through the working directory they
inherit from the driver.
"""

from __future__ import annotations

import os
import time

import pytest

from infra.ray_cluster import REPO_ROOT, RaySession, ray_session
from infra.resources import (
    STAGE_RESOURCES,
    StageResources,
    largest_node_cpus,
    resources_for,
    thread_env,
    torch_device,
)

_FAKE_API_URL = "http://127.0.0.1:9/api"


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory) -> RaySession:
    """A local 2-CPU Ray started by our helper, driven from outside the repo."""
    import ray  # noqa: F401 - its import sets RAY_CLIENT_MODE; compare after that

    saved_cwd, saved_api_url = os.getcwd(), os.environ.get("PREFECT_API_URL")
    saved_ray_vars = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    os.chdir(tmp_path_factory.mktemp("driver-cwd"))
    os.environ["PREFECT_API_URL"] = _FAKE_API_URL
    try:
        started = time.monotonic()
        with ray_session(num_cpus=2) as session:
            print(f"\nray: started in {time.monotonic() - started:.1f} s at {session.address}")
            yield session
        assert {k: v for k, v in os.environ.items() if k.startswith("RAY_")} == saved_ray_vars
        assert not session.temp_dir.exists()
    finally:
        os.chdir(saved_cwd)
        if saved_api_url is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved_api_url


def test_local_session_is_ours_with_a_short_temp_dir(ray_local):
    assert ray_local.started_here
    assert len(str(ray_local.temp_dir)) <= 40
    assert str(ray_local.temp_dir).startswith("/tmp/")


def test_workers_import_repo_packages_and_see_prefect_url(ray_local):
    import ray

    @ray.remote(num_cpus=0.25)
    def probe() -> dict:
        import infra.resources

        return {
            "module": infra.resources.__file__,
            "cwd": os.getcwd(),
            "api_url": os.environ.get("PREFECT_API_URL"),
            "omp": os.environ.get("OMP_NUM_THREADS"),
            "mkl": os.environ.get("MKL_NUM_THREADS"),
            "opencv": __import__("cv2").getNumThreads(),
        }

    seen = ray.get(probe.remote(), timeout=60)
    assert seen["module"].startswith(str(REPO_ROOT))
    assert not seen["cwd"].startswith(str(REPO_ROOT))
    assert seen["api_url"] == _FAKE_API_URL
    assert seen["omp"] == seen["mkl"] == "1"
    assert seen["opencv"] == 1  # OpenCV's own pool, a thread per core unless capped


def test_map_batches_with_fractional_cpu_actor_pool(ray_local):
    import ray

    class Doubler:
        """Stands in for a model actor: state set once, then batches."""

        def __init__(self) -> None:
            self.factor = 2

        def __call__(self, batch: dict) -> dict:
            return {"x": batch["x"], "y": batch["x"] * self.factor}

    select = resources_for("select", gpus_available=0)
    rows = (
        ray.data.from_items([{"x": i} for i in range(40)])
        .map_batches(
            Doubler,
            compute=ray.data.ActorPoolStrategy(size=select.actors),
            batch_size=select.batch_size,
            **select.ray_options(),
        )
        .take_all()
    )
    assert sorted((r["x"], r["y"]) for r in rows) == [(i, 2 * i) for i in range(40)]


def test_nested_session_reuses_the_running_ray(ray_local):
    with ray_session() as inner:
        assert inner == ray_local
    with pytest.raises(ValueError, match="num_cpus"):
        with ray_session(num_cpus=1):
            pass
    import ray

    assert ray.is_initialized()


def test_resources_table_covers_every_stage_with_fractional_model_actors():
    stages = {"ingest", "select", "bootstrap", "generate", "label", "train_reward",
              "finetune", "evaluate"}
    assert set(STAGE_RESOURCES) == stages
    for name in ("select", "label", "evaluate"):
        assert STAGE_RESOURCES[name].num_cpus < 1, name


def test_resources_for_applies_overrides_and_clamps_gpus():
    assert resources_for("generate", gpus_available=0).num_gpus == 0
    assert resources_for("generate", gpus_available=4).num_gpus == 1
    tuned = resources_for("label", {"batch_size": 2, "actors": 3}, gpus_available=0)
    assert (tuned.batch_size, tuned.actors, tuned.num_cpus) == (2, 3, 0.25)
    with pytest.raises(KeyError, match="unknown stage"):
        resources_for("decode")
    with pytest.raises(KeyError, match="batchsize"):
        resources_for("label", {"batchsize": 2})
    with pytest.raises(ValueError, match="batch_size"):
        StageResources(num_cpus=1, num_gpus=0, actors=1, batch_size=0)


def test_threads_follow_whole_reserved_cpus():
    assert StageResources(0.25, 0, 2, 8).ray_options() == {"num_cpus": 0.25, "num_gpus": 0}
    two_cpus = StageResources(2.0, 0, 1, 8).ray_options()
    assert two_cpus["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    assert thread_env(1)["OPENBLAS_NUM_THREADS"] == "1"


def test_share_node_stages_split_a_node_between_their_workers():
    # the stage's workers are all that runs while it runs: a node's CPUs split between them
    assert resources_for("finetune", gpus_available=0, node_cpus=2).num_cpus == 2
    assert resources_for("finetune", {"actors": 2}, gpus_available=0, node_cpus=2).num_cpus == 1
    assert resources_for("generate", {"actors": 3}, gpus_available=0, node_cpus=16).num_cpus == 5
    assert resources_for("generate", {"actors": 4}, gpus_available=0, node_cpus=2).num_cpus == 0.5  # the row's floor
    assert resources_for("finetune", {"num_cpus": 1.0}, gpus_available=0, node_cpus=8).num_cpus == 1  # config wins
    assert resources_for("label", gpus_available=0, node_cpus=8).num_cpus == 0.25  # an actor pool beside Ray Data
    assert resources_for("finetune", gpus_available=0).num_cpus == 1  # node unknown: the row


def test_a_share_node_actor_computes_with_the_whole_node(ray_local):
    import ray

    res = resources_for("finetune", gpus_available=0, node_cpus=largest_node_cpus())
    assert largest_node_cpus() == 2 and res.num_cpus == 2

    @ray.remote
    def threads() -> tuple[str | None, int]:
        import torch

        return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    assert ray.get(threads.options(**res.ray_options()).remote(), timeout=120) == ("2", 2)


def test_torch_device_is_cpu_without_a_gpu_request():
    assert torch_device(0) == "cpu"
    assert torch_device(1) in {"cpu", "cuda"}
