"""The multi-node configs in infra/ray/ agree with the code: the Ray version of the pin, GPU worker
groups that hold a model actor of every GPU stage, the repository and the runs folder at the same
path on every node, and token auth everywhere."""

from __future__ import annotations

from pathlib import Path

import ray
import yaml

from infra.resources import STAGE_RESOURCES

INFRA = Path(__file__).resolve().parent.parent / "infra" / "ray"


def test_cluster_launcher_config():
    cfg = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}, "no model actor on the head"
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    # every model stage's actor fits on a GPU node (a request larger than any node would wait forever)
    for stage, res in STAGE_RESOURCES.items():
        assert any(t["resources"]["GPU"] >= res.num_gpus and t["resources"]["CPU"] >= res.num_cpus for t in gpu), stage
    assert "~/prefloop" in cfg["file_mounts"] and any("pip install -q -e ." in c for c in cfg["setup_commands"])
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)


def test_kuberay_raycluster():
    cluster, claim = yaml.safe_load_all((INFRA / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray.__version__, "the image's Ray must be the pinned one"
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    groups = cluster["spec"]["workerGroupSpecs"]
    gpu = [g for g in groups if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0) >= 1]
    assert gpu and gpu[0]["maxReplicas"] >= gpu[0]["minReplicas"]
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in groups]
    for pod in pods:
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["PREFLOOP_RUNS"] == mounts["runs"] == "/runs", "one runs folder, same path everywhere"
        assert env["RAY_AUTH_MODE"] == "token" and container["workingDir"] == "/opt/prefloop"
        assert any(v["name"] == "runs" and v["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
                   for v in pod["volumes"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
