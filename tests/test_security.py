"""Security rules that hold everywhere (DESIGN.md): checkpoints load only as safetensors, nothing
unpickles, `trust_remote_code` is off unless a config turns it on, the Prefect server listens on
loopback, and no secret from the environment reaches a manifest, a marker or a log."""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from flows.config import RunConfig
from tests.test_cli import REPO

PACKAGES = ("data_contracts", "tasks", "models", "flows", "infra")
# Receivers of `.from_pretrained` that load no weights, or that are our own safetensors loaders.
NO_WEIGHTS = {"AutoTokenizer", "AutoProcessor", "AutoConfig", "Policy", "RewardModel", "cls", "PeftModel"}


def _package_calls():
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                yield path.relative_to(REPO), node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _name(node: ast.AST) -> str:
    return ast.unparse(node)


def test_the_package_never_unpickles_and_loads_weights_only_as_safetensors():
    problems = []
    for path, node in _package_calls():
        where = f"{path}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(n.split(".")[0] in ("pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle") for n in names):
                problems.append(f"{where}: imports a pickle module")
        if not isinstance(node, ast.Call):
            continue
        func = _name(node.func)
        if func.endswith("torch.load"):
            wo = _keyword(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        if func.endswith("np.load") or func.endswith("numpy.load"):
            ap = _keyword(node, "allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True:
                problems.append(f"{where}: np.load(allow_pickle=True)")
        if func in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            problems.append(f"{where}: {func} (use yaml.safe_load)")
        if func in ("eval", "exec"):
            problems.append(f"{where}: {func}()")
        trc = _keyword(node, "trust_remote_code")
        if isinstance(trc, ast.Constant) and trc.value is True:
            problems.append(f"{where}: trust_remote_code=True hard-coded")
        if func.endswith(".from_pretrained") and isinstance(node.func, ast.Attribute):
            receiver = _name(node.func.value)
            if receiver not in NO_WEIGHTS and not receiver.startswith(("processor", "self.processor")):
                st = _keyword(node, "use_safetensors")
                if not (isinstance(st, ast.Constant) and st.value is True):
                    problems.append(f"{where}: {receiver}.from_pretrained without use_safetensors=True")
    assert problems == []


def _config_fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        for arg in [field.annotation, *getattr(field.annotation, "__args__", ())]:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _config_fields(arg, f"{prefix}{name}.")


def test_trust_remote_code_is_off_unless_a_config_turns_it_on():
    from models.reward_model import RewardModelConfig
    from models.vlm import VLMConfig

    seen = [name for name, field in _config_fields(RunConfig) if name.endswith("trust_remote_code")]
    for model in (VLMConfig, RewardModelConfig):
        seen += [f"{model.__name__}.{n}" for n, f in _config_fields(model) if n.endswith("trust_remote_code")]
        assert model.model_fields["trust_remote_code"].default is False
    for name, field in _config_fields(RunConfig):
        if name.endswith("trust_remote_code"):
            assert field.default is False, name
    assert seen, "the configs that load hub code have the switch"


class _Payload:
    """A pickle that creates a file when it is loaded: what a hostile checkpoint does."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return (open, (str(self.canary), "w"))


def _plant_pickle(folder: Path, name: str, canary: Path) -> None:
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / name).write_bytes(pickle.dumps({"weight": _Payload(canary)}))


def test_a_checkpoint_with_only_pickled_weights_is_refused_unopened(tmp_path):
    from models.clip_model import load_clip
    from models.policy import Policy, PolicyConfig, build_tiny
    from models.vlm import VLMConfig, VLMCritic, build_tiny_vlm

    canary = tmp_path / "pwned"
    # 1. a diffusers transformer
    folder = tmp_path / "transformer"
    build_tiny("wan", folder, layers=1, dim=32, head_dim=16)
    _plant_pickle(folder, "diffusion_pytorch_model.bin", canary)
    with pytest.raises(OSError, match="cannot load a WanTransformer3DModel"):
        Policy.from_pretrained(PolicyConfig(family="wan", transformer=str(folder), text_encoder=str(tmp_path / "te")))
    # 2. a transformers VLM (the critic)
    vlm = build_tiny_vlm(tmp_path / "vlm")
    _plant_pickle(vlm, "pytorch_model.bin", canary)
    with pytest.raises(OSError):
        VLMCritic(VLMConfig(model=str(vlm), device="cpu"))
    # 3. open_clip weights as a pickle file
    pt = tmp_path / "clip.pt"
    pt.write_bytes(pickle.dumps(_Payload(canary)))
    with pytest.raises(ValueError, match="not a .safetensors file"):
        load_clip("ViT-B-32", pt)
    assert not canary.exists(), "a pickle was loaded"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of TCP sockets listening on `port` (hex from /proc/net/tcp)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_the_prefect_server_listens_on_loopback_only(prefect_server):
    import inspect

    from flows.cli import build_parser
    from infra.prefect_server import start_server

    assert inspect.signature(start_server).parameters["host"].default == "127.0.0.1"
    assert build_parser().parse_args(["server"]).host == "127.0.0.1"
    assert _listening_addresses(prefect_server.port) == {"0100007F"}, "127.0.0.1, not 0.0.0.0 or a public address"


SECRETS = {"HF_TOKEN": "hf_SECRETtoken0123456789", "AWS_SECRET_ACCESS_KEY": "aws/SECRET/0123456789abcdef",
           "WANDB_API_KEY": "wandbSECRET0123456789"}


def test_no_secret_from_the_environment_reaches_manifests_markers_or_logs(tmp_path, prefect_server):
    runs = tmp_path / "runs"
    env = {**os.environ, **SECRETS}
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--runs-root", str(runs), "stage", "select", "--run", "s",
         "--set", "ingest.world.num_clips=16", "--set", "select.text.model=none"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (runs / "s" / "select" / "manifest.parquet").exists()
    places = {"stdout": out.stdout.encode(), "stderr": out.stderr.encode()}
    for path in runs.rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_bytes()
    state_dir = prefect_server.home.parent  # the server's database holds every flow run's logs and parameters
    for path in state_dir.glob("prefect.db*"):
        places[str(path)] = path.read_bytes()
    leaks = [(where, name) for where, data in places.items() for name, secret in SECRETS.items() if secret.encode() in data]
    assert leaks == []
    assert any("prefect.db" in p for p in places) and len(places) > 5
