"""The whole-run config: one section per stage, from a YAML file and `--set` overrides.

    prefloop run --config run.yaml --set ingest.source=/data/clips --set ingest.world.num_clips=500

Resolution order: defaults < the run's saved `config.yaml` (when rerunning a run) < `--config FILE`
< `--set` overrides. An unknown key anywhere is an error that lists the valid keys. The resolved
config is saved in the run directory, so a run records what actually ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data_contracts import RunLayout
from data_contracts.lineage import atomic_write_bytes
from tasks.bootstrap import BootstrapConfig
from tasks.evaluate import EvaluateConfig
from tasks.finetune import FinetuneConfig
from tasks.generate import GenerateConfig
from tasks.ingest import IngestConfig
from tasks.label import LabelConfig
from tasks.select import SelectConfig
from tasks.train_reward import TrainRewardConfig


class RunSection(BaseModel):
    """Settings of the run itself, not of a stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_roots: tuple[str, ...] = Field(
        (), description="folders outside the run that manifests may reference (the ingest source is added itself)"
    )
    task_retries: int = Field(1, ge=0, description="Prefect retries of a failed stage task")
    rounds: int = Field(
        2, ge=0, description="alignment rounds after select (IPO runs 3; 2 fit the embedded default in ~15 minutes "
        "on 2 cores); each round is generate → label → train_reward → finetune → evaluate → gate"
    )
    train_reward: Literal["every_round", "first_round", "never"] = Field(
        "first_round",
        description="when the reward model is trained: on every round's labels, on round 1's only (later rounds "
        "use it; the default since session 11: its ~12 s a round went to finetune's real-clip phase, and on one "
        "round's ~50 pairs it did not beat chance), or never (then evaluate.win_rates must be false, and "
        "label.critic=reward_model needs label.reward_model)",
    )
    gate: bool = Field(
        True, description="stop the loop when a round's gate says stop; false runs every round whatever it says "
        "(smoke tests, fixed schedules): the verdict is still logged and reported",
    )
    ray_address: str | None = Field(
        None, description="join this Ray cluster (host:port or ray://host:port); None starts a local Ray per stage"
    )


class RunConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="after")
    def _reward_model_exists(self) -> RunConfig:
        if self.run.train_reward == "never" and self.evaluate.win_rates:
            raise ValueError(
                "run.train_reward=never leaves evaluate without a reward model for its win rates; set "
                "evaluate.win_rates=false"
            )
        return self

    def reward_round(self, round_: int, for_label: bool = False) -> int | None:
        """The round whose `train_reward` output serves round `round_`'s evaluate (or, `for_label`, its
        label stage, which runs before that round's reward model exists); None: no trained one."""
        latest = round_ - 1 if for_label else round_
        if latest < 1 or self.run.train_reward == "never":
            return None
        return 1 if self.run.train_reward == "first_round" else latest

    run: RunSection = Field(default_factory=RunSection)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    train_reward: TrainRewardConfig = Field(default_factory=TrainRewardConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    def layout(self, runs_root: Path, name: str) -> RunLayout:
        roots = [Path(p) for p in self.run.data_roots]
        source_root = self.ingest.data_root()
        if source_root is not None:
            roots.append(source_root)
        return RunLayout(Path(runs_root), name, extra_roots=tuple(roots))


class ConfigError(ValueError):
    pass


def _check_keys(data: Mapping[str, Any], model: type[BaseModel], where: str, origin: str) -> None:
    """Unknown keys name the valid ones (pydantic's own message does not)."""
    fields = model.model_fields
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"{origin}: unknown key `{dotted}`; valid keys{' of `' + where + '`' if where else ''}: {valid}")
        annotation = fields[key].annotation
        if isinstance(value, Mapping) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_keys(value, annotation, dotted, origin)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_set(item: str) -> dict[str, Any]:
    """`ingest.world.num_clips=500` → {"ingest": {"world": {"num_clips": 500}}} (values parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: write it as `stage.key=value`, for example `--set ingest.source=/data/clips`")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set {item!r}: name the section too, for example `ingest.{key.strip()}=…`")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        nested = {p: nested}
    return nested


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config file `{path}`: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"`{path}` is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"`{path}`: the top level must be a mapping of sections (run, ingest, …)")
    return data


def resolve_config(
    saved: Path | None = None, config_file: Path | None = None, overrides: list[str] | None = None
) -> RunConfig:
    data: dict[str, Any] = {}
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if saved is not None and Path(saved).exists():
        layers.append((str(saved), load_yaml(saved)))
    if config_file is not None:
        layers.append((str(config_file), load_yaml(config_file)))
    for item in overrides or []:
        layers.append((f"--set {item}", parse_set(item)))
    for origin, layer in layers:
        _check_keys(layer, RunConfig, "", origin)
        data = _merge(data, layer)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"`{'.'.join(map(str, e['loc']))}`: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid config: {problems}") from None


def save_config(cfg: RunConfig, path: Path) -> None:
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    atomic_write_bytes(Path(path), text.encode())
