"""The versioned schema of every manifest kind prefloop passes between stages.

A contract is the explicit pyarrow schema of one manifest kind plus the rules a schema cannot
say: which values a column may take, which column is the row id, and which columns hold file
paths (that must stay inside the run's data roots and exist). Bump `version` whenever a column
is added, removed or changes meaning; readers refuse versions they do not know.

Column names use the field's vocabulary (`prompt`, `video_path`, `caption`, `video_a`/`video_b`,
`label_vq`/`label_mq`/`label_ta`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import pyarrow as pa

# Why a row of the `videos` manifest cannot be used; null means the video is usable.
VIDEO_REASONS = frozenset(
    {
        "missing_file",
        "empty_file",
        "not_a_video",
        "truncated",
        "no_frames",
        "missing_caption",
        "outside_data_roots",
        # a listing path that is a folder, a FIFO or a device: never opened as a video
        "not_a_file",
        # captions with control characters (other than whitespace), or longer than
        # `ingest.max_caption_chars`: kept as written, never used as a prompt
        "bad_caption",
        "caption_too_long",
    }
)
# Reasons that concern the caption, not the file: such a row's caption is no prompt.
CAPTION_REASONS = frozenset({"missing_caption", "bad_caption", "caption_too_long"})
PAIR_LABELS = frozenset({"A", "B", "tie", "invalid"})
SPLITS = frozenset({"train", "heldout"})
DIMENSIONS = ("vq", "mq", "ta")


@dataclass(frozen=True)
class PathRule:
    """A column holding a file path.

    Relative paths resolve against the run directory. `required_unless` names a column whose
    non-null value excuses a missing file (a `videos` row with a `reason` records a file that is
    missing or broken on purpose).
    """

    required_unless: str | None = None
    # A row whose `reason` says its path is outside the data roots records that path without it
    # ever being opened; every other row must stay inside the roots.
    outside_reason: str | None = None


@dataclass(frozen=True)
class Contract:
    kind: str
    version: int
    schema: pa.Schema
    id_column: str
    allowed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    paths: Mapping[str, PathRule] = field(default_factory=dict)
    # What the writer of a bad manifest should do, per column (the default names the stage).
    hints: Mapping[str, str] = field(default_factory=dict)
    # Inclusive (low, high) bounds of numeric columns (None: unbounded on that side); NaN and
    # infinities are always out of bounds. Sizes, counts and rates are never negative.
    bounds: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    producer: str = ""

    def __post_init__(self) -> None:
        for name in [self.id_column, *self.allowed, *self.paths, *self.hints, *self.bounds]:
            if self.schema.get_field_index(name) < 0:
                raise ValueError(f"contract `{self.kind}` names column `{name}` that its schema lacks")
        object.__setattr__(self, "allowed", MappingProxyType(dict(self.allowed)))
        object.__setattr__(self, "paths", MappingProxyType(dict(self.paths)))
        object.__setattr__(self, "hints", MappingProxyType(dict(self.hints)))
        object.__setattr__(self, "bounds", MappingProxyType(dict(self.bounds)))


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


VIDEOS = Contract(
    kind="videos",
    version=1,
    producer="ingest",
    id_column="video_id",
    schema=pa.schema(
        [
            _f("video_id", pa.string()),
            _f("video_path", pa.string()),
            _f("caption", pa.string(), nullable=True),
            _f("source", pa.string()),
            _f("split", pa.string()),
            _f("reason", pa.string(), nullable=True),
            _f("file_bytes", pa.int64(), nullable=True),
            _f("fps", pa.float64(), nullable=True),
            _f("num_frames", pa.int32(), nullable=True),
            _f("width", pa.int32(), nullable=True),
            _f("height", pa.int32(), nullable=True),
            _f("duration_s", pa.float64(), nullable=True),
        ]
    ),
    allowed={"reason": VIDEO_REASONS, "split": SPLITS},
    paths={"video_path": PathRule(required_unless="reason", outside_reason="outside_data_roots")},
    hints={"caption": "give every video a caption, or keep it with `reason` = `missing_caption`"},
    bounds={name: (0, None) for name in ("file_bytes", "fps", "num_frames", "width", "height", "duration_s")},
)

# Ground truth of the embedded world. Only the judge's calibration and `evaluate` read it: the
# stages that learn (select, bootstrap, label, train_reward, finetune) never do.
WORLD_TRUTH = Contract(
    kind="world_truth",
    version=1,
    producer="ingest",
    id_column="video_id",
    schema=pa.schema(
        [
            _f("video_id", pa.string()),
            _f("motion", pa.string()),
            _f("colours", pa.string()),
            _f("direction", pa.string()),
            _f("num_balls", pa.int32()),
            _f("bounces", pa.int32()),
            _f("violation", pa.string()),
            _f("violation_frame", pa.int32()),
            _f("defect", pa.string()),
            _f("plausible", pa.bool_()),
            _f("caption_matches", pa.bool_()),
            _f("scene_json", pa.string()),
        ]
    ),
)

SELECTION = Contract(
    kind="selection",
    version=1,
    producer="select",
    id_column="video_id",
    schema=pa.schema(
        [
            _f("video_id", pa.string()),
            _f("video_path", pa.string()),
            _f("caption", pa.string(), nullable=True),
            _f("split", pa.string()),
            _f("score_motion", pa.float64(), nullable=True),
            _f("score_static", pa.float64(), nullable=True),
            _f("score_scene_cut", pa.float64(), nullable=True),
            _f("score_flicker", pa.float64(), nullable=True),
            _f("score_sharpness", pa.float64(), nullable=True),
            _f("score_quality", pa.float64(), nullable=True),
            _f("score_clip", pa.float64(), nullable=True),
            _f("score_physics", pa.float64(), nullable=True),
            _f("score_caption", pa.float64(), nullable=True),
            _f("final_score", pa.float64(), nullable=True),
            _f("passed_json", pa.string()),
            _f("reason", pa.string(), nullable=True),
            _f("selected", pa.bool_()),
        ]
    ),
    allowed={"split": SPLITS},
    # select passes the `videos` reason on, so a path recorded as outside the roots stays recorded
    paths={"video_path": PathRule(required_unless="reason", outside_reason="outside_data_roots")},
)

GENERATIONS = Contract(
    kind="generations",
    version=1,
    producer="generate",
    id_column="generation_id",
    schema=pa.schema(
        [
            _f("generation_id", pa.string()),
            _f("prompt_id", pa.string()),
            _f("prompt", pa.string()),
            _f("sample_index", pa.int32()),
            _f("seed", pa.int64()),
            _f("video_path", pa.string()),
            _f("latent_path", pa.string(), nullable=True),
            _f("first_frame_path", pa.string(), nullable=True),
            _f("policy_id", pa.string()),
            _f("steps", pa.int32()),
            _f("guidance", pa.float64()),
            _f("round", pa.int32()),
        ]
    ),
    paths={"video_path": PathRule(), "latent_path": PathRule(), "first_frame_path": PathRule()},
    bounds={"sample_index": (0, None), "steps": (1, None), "guidance": (0, None), "round": (1, None)},
)

LABELS = Contract(
    kind="labels",
    version=1,
    producer="label",
    id_column="pair_id",
    schema=pa.schema(
        [
            _f("pair_id", pa.string()),
            _f("prompt", pa.string()),
            _f("video_a", pa.string()),
            _f("video_b", pa.string(), nullable=True),
            _f("label_vq", pa.string(), nullable=True),
            _f("label_mq", pa.string(), nullable=True),
            _f("label_ta", pa.string(), nullable=True),
            _f("score_vq", pa.float64(), nullable=True),
            _f("score_mq", pa.float64(), nullable=True),
            _f("score_ta", pa.float64(), nullable=True),
            _f("critic", pa.string()),
            _f("rationale", pa.string(), nullable=True),
            _f("raw_response", pa.string(), nullable=True),
            _f("round", pa.int32()),
        ]
    ),
    allowed={f"label_{d}": PAIR_LABELS for d in DIMENSIONS},
    paths={"video_a": PathRule(), "video_b": PathRule()},
)

EVALUATION = Contract(
    kind="evaluation",
    version=1,
    producer="evaluate",
    id_column="eval_id",
    schema=pa.schema(
        [
            _f("eval_id", pa.string()),
            _f("round", pa.int32()),
            _f("policy_id", pa.string()),
            _f("prompt_id", pa.string()),
            _f("prompt", pa.string()),
            _f("seed", pa.int64()),
            _f("video_path", pa.string()),
            _f("plausible", pa.bool_(), nullable=True),
            _f("caption_agreement", pa.bool_(), nullable=True),
            _f("reward_vq", pa.float64(), nullable=True),
            _f("reward_mq", pa.float64(), nullable=True),
            _f("reward_ta", pa.float64(), nullable=True),
            _f("subject_consistency", pa.float64(), nullable=True),
            _f("motion_smoothness", pa.float64(), nullable=True),
            _f("dynamic_degree", pa.float64(), nullable=True),
            _f("imaging_quality", pa.float64(), nullable=True),
        ]
    ),
    paths={"video_path": PathRule()},
)

CHECKPOINT_KINDS = frozenset({"policy", "policy_lora", "reward_model", "clip", "text_encoder"})
CHECKPOINT_FORMATS = frozenset({"diffusers", "peft", "transformers", "open_clip", "safetensors"})

CHECKPOINTS = Contract(
    kind="checkpoints",
    version=1,
    producer="bootstrap",
    id_column="checkpoint_id",
    schema=pa.schema(
        [
            _f("checkpoint_id", pa.string()),
            _f("kind", pa.string()),
            _f("format", pa.string()),
            _f("path", pa.string()),
            _f("base_id", pa.string(), nullable=True),
            _f("round", pa.int32(), nullable=True),
            _f("metrics_json", pa.string(), nullable=True),
        ]
    ),
    allowed={"kind": CHECKPOINT_KINDS, "format": CHECKPOINT_FORMATS},
    paths={"path": PathRule()},
)

CONTRACTS: Mapping[str, Contract] = MappingProxyType(
    {c.kind: c for c in (VIDEOS, WORLD_TRUTH, SELECTION, GENERATIONS, LABELS, EVALUATION, CHECKPOINTS)}
)


def contract(kind: str) -> Contract:
    """The contract of a manifest kind; an unknown kind lists the known ones."""
    try:
        return CONTRACTS[kind]
    except KeyError:
        raise KeyError(f"unknown manifest kind `{kind}`; known kinds: {', '.join(CONTRACTS)}") from None
