"""The embedded physics world: tiny procedurally rendered clips whose ground truth is known.

Balls fall, are thrown, roll and collide in a square frame with a grey floor band at the bottom
and no walls. Physics runs in normalised units (the frame is 1 x 1, y grows downward like image
rows, time in seconds), so the same scene renders at 16 or 32 px. Motion is exact: flights are
parabolas, floor bounces are solved in closed form event by event, and the only collision (two
equal-mass balls rolling on the floor) exchanges velocities, which makes each ball's track the
min/max of two straight lines.

Besides plausible clips the world makes the two kinds of bad data the pipeline must cope with:
physically implausible variants (`VIOLATIONS`, what a generator gets wrong) and web-video
defects (`DEFECTS`, what a scraped dataset contains). `make_clip` is the one entry point the
ingest stage calls; the other public functions are its pieces.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

MOTIONS = ("falls", "thrown", "rolls", "collide")
VIOLATIONS = ("anti_gravity", "teleport", "colour_change", "stop_midair", "pass_through_floor")
DEFECTS = ("static", "scene_cut", "flicker", "blur", "caption_mismatch", "too_short", "corrupt")

# Hues about 50-90 degrees apart, saturated and bright on a neutral background: after 4:2:0 mp4
# coding, blur and noise the nearest palette hue is still the right one.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "yellow": (230, 210, 40),
    "green": (45, 190, 70),
    "blue": (40, 100, 235),
    "purple": (175, 55, 230),
}

# Which scenes can show each violation clearly (a freeze or a fall through the floor needs a
# ball in the air; a colour change works everywhere).
VIOLATION_MOTIONS: dict[str, tuple[str, ...]] = {
    "anti_gravity": ("falls", "thrown", "rolls"),
    "teleport": ("falls", "thrown", "rolls"),
    "colour_change": ("falls", "thrown", "rolls", "collide"),
    "stop_midair": ("falls", "thrown"),
    "pass_through_floor": ("falls", "thrown"),
}

# Horizontal travel over the whole clip, as a fraction of the frame: large enough that "to the
# left" is obvious, small enough that the ball stays in a frame without walls.
TRAVEL_RANGE = (0.3, 0.6)
COLLIDE_TRAVEL_RANGE = (0.2, 0.45)
# Starting heights above the resting height (falls; thrown) and the vertical speed of a throw
# (frames per second, up is negative): every in-air ball starts clearly off the floor.
FALL_HEIGHT_MIN = 0.3
THROW_HEIGHT_MIN = 0.25
THROW_VY_RANGE = (-1.6, 0.4)
# A bounce whose rebound would rise less than this (fraction of the frame) ends in rest: smaller
# hops are invisible at 16-32 px and would make the event loop chase Zeno bounces.
REST_HEIGHT = 0.02
# Violations must be clearly visible (fractions of the frame, speeds in frames per second).
TELEPORT_RANGE = (0.4, 0.55)  # sideways jump
MIN_DEVIATION = 0.25  # distance from the physical path that a freeze or a gravity flip reaches
FREEZE_HEIGHT = 0.2  # gap under a frozen ball: plainly in mid-air, not resting
MIN_FREEZE_SPEED = 0.6  # a frozen ball was moving >= 1.2 px per frame at 16 px, 8 fps
TURN_HEIGHT = 0.25  # anti-gravity turns a fall around this far above the floor
SINK_DEPTH = 0.15  # pass_through_floor: the ball ends at least this far below its resting height
MAX_TRIES = 500

_BOUNCE_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times", 5: "five times",
                 6: "six times", 7: "seven times", 8: "eight times", 9: "nine times"}


@dataclass(frozen=True)
class WorldSpec:
    """Size and physics of the world; lengths are fractions of the frame, time in seconds."""

    size: int = 16  # px, square; the tiny default
    frames: int = 8
    fps: float = 8.0
    gravity: float = 6.0  # frame heights / s^2: a drop from the top lands in ~3 frames at 8 fps
    ball_radius: float = 0.14  # 2.24 px at 16 px: a ball ~4.5 px across
    floor_height: float = 0.125  # 2 px at 16 px
    restitution: tuple[float, float] = (0.5, 0.8)  # rubber-ball range: bounces stay visible
    background: tuple[int, int, int] = (40, 40, 40)  # neutral, so ball hue is the only colour
    floor_colour: tuple[int, int, int] = (128, 128, 128)
    supersample: int = 8  # per axis, for anti-aliased sub-pixel discs

    def __post_init__(self) -> None:
        if self.size < 8 or self.size % 2:
            raise ValueError(f"WorldSpec.size must be an even number >= 8 (mp4 needs even sizes), got {self.size}")
        if self.frames < 4:
            raise ValueError(f"WorldSpec.frames must be >= 4 so a violation can start after the first third, got {self.frames}")
        if not self.fps > 0 or not self.gravity > 0:
            raise ValueError(f"WorldSpec.fps and gravity must be positive, got fps={self.fps}, gravity={self.gravity}")
        if not 0.05 <= self.ball_radius <= 0.2:
            raise ValueError(f"WorldSpec.ball_radius must be in [0.05, 0.2] of the frame, got {self.ball_radius}")
        if not 0.0 < self.floor_height <= 0.25:
            raise ValueError(f"WorldSpec.floor_height must be in (0, 0.25] of the frame, got {self.floor_height}")
        low, high = self.restitution
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"WorldSpec.restitution must be a range within (0, 1], got {self.restitution}")

    @property
    def floor_top(self) -> float:
        """y of the floor's upper edge."""
        return 1.0 - self.floor_height

    @property
    def rest_y(self) -> float:
        """Centre height of a ball lying on the floor."""
        return self.floor_top - self.ball_radius

    @property
    def duration(self) -> float:
        """Seconds from the first to the last frame."""
        return (self.frames - 1) / self.fps

    @property
    def rest_speed(self) -> float:
        """Rebound speed below which a bouncing ball settles (rebound height REST_HEIGHT)."""
        return math.sqrt(2.0 * self.gravity * REST_HEIGHT)

    @property
    def onset_min(self) -> int:
        """First frame a violation may start on: the first third shows the scene as captioned."""
        return math.ceil(self.frames / 3)

    def times(self, frames: int | None = None) -> np.ndarray:
        """Frame times in seconds."""
        return np.arange(self.frames if frames is None else frames) / self.fps


@dataclass(frozen=True)
class Ball:
    """A ball's colour, its state at t = 0 and its bounciness."""

    colour: str
    x0: float
    y0: float
    vx: float
    vy: float
    restitution: float


@dataclass(frozen=True)
class Scene:
    """One scene: what happens (`motion`) and to which balls."""

    motion: str
    balls: tuple[Ball, ...]

    def to_json(self) -> str:
        """Plain JSON, so a manifest row can re-render the scene."""
        return json.dumps({"motion": self.motion, "balls": [asdict(b) for b in self.balls]}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Scene:
        """Inverse of `to_json`."""
        data = json.loads(text)
        return Scene(data["motion"], tuple(Ball(**b) for b in data["balls"]))


@dataclass(frozen=True)
class Violation:
    """A physically impossible change, starting at frame `onset`, to ball `ball`."""

    name: str
    onset: int
    ball: int = 0
    shift: float = 0.0  # teleport: horizontal jump, fraction of the frame
    colour: str = ""  # colour_change: the new colour

    def to_json(self) -> str:
        """Plain JSON for the manifest."""
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True, eq=False)
class Trajectory:
    """Ball centres (F, B, 2) as (x, y) fractions of the frame and their colours per frame."""

    times: np.ndarray
    positions: np.ndarray
    colours: tuple[tuple[str, ...], ...]
    bounces: tuple[int, ...]


@dataclass(frozen=True)
class CaptionFacts:
    """What a caption states; colours sorted so the order of mention does not matter."""

    colours: tuple[str, ...]
    motion: str
    direction: str
    bounces: int | None = None


@dataclass(frozen=True, eq=False)
class Clip:
    """One rendered clip with its caption and ground truth (`frames` is None for `corrupt`)."""

    frames: np.ndarray | None
    caption: str
    truth: dict = field(default_factory=dict)
    scene: Scene | None = None


# ---------------------------------------------------------------------------------------------
# Physics


def floor_bounce(y0, vy0, restitution, times, *, floor_y: float, gravity: float, rest_speed: float):
    """Heights, vertical speeds and bounce counts of balls that fly under gravity above a floor.

    Exact and event based: each flight is y(t) = y_s + v_s (t - t_s) + g (t - t_s)^2 / 2 until the
    impact time solved in closed form, τ = (-v_s + sqrt(v_s^2 + 2 g (floor - y_s))) / g; the ball
    leaves with speed e·v_impact, or rests when that is below `rest_speed`. Vectorised over any
    number of balls (the judge evaluates thousands of candidate fits at once); each event round
    only touches the balls still flying.

    Returns (y (N, T), vy (N, T), bounces (N,)) where bounces counts rebounds up to times[-1].
    """
    y_s, v_s, e = (np.atleast_1d(np.asarray(a, dtype=float)).ravel() for a in np.broadcast_arrays(y0, vy0, restitution))
    t = np.asarray(times, dtype=float)
    t_end = float(t[-1]) if t.size else 0.0
    y = np.empty((len(y_s), len(t)))
    v = np.empty_like(y)
    bounces = np.zeros(len(y_s), dtype=int)
    rows = np.arange(len(y_s))
    y_s, t_s = np.minimum(y_s, floor_y), np.zeros(len(y_s))
    while rows.size:
        # 1. this flight of every ball still flying: from t_s until its impact with the floor
        tau = (-v_s + np.sqrt(np.maximum(v_s**2 + 2.0 * gravity * (floor_y - y_s), 0.0))) / gravity
        t_hit = t_s + tau
        dt = t[None, :] - t_s[:, None]
        now = dt >= 0
        y[rows] = np.where(now, y_s[:, None] + v_s[:, None] * dt + 0.5 * gravity * dt**2, y[rows])
        v[rows] = np.where(now, v_s[:, None] + gravity * dt, v[rows])
        # 2. the impact: rest, or rebound if it happens within the clip
        rebound = e * (v_s + gravity * tau)
        settles = rebound < rest_speed
        if settles.any():
            after = settles[:, None] & (t[None, :] >= t_hit[:, None])
            y[rows] = np.where(after, floor_y, y[rows])
            v[rows] = np.where(after, 0.0, v[rows])
        goes_on = ~settles & (t_hit <= t_end)
        bounces[rows[goes_on]] += 1
        # 3. the next flight starts on the floor, moving up
        rows, t_s, e = rows[goes_on], t_hit[goes_on], e[goes_on]
        y_s, v_s = np.full(rows.size, floor_y), -rebound[goes_on]
    return y, v, bounces


def collide_tracks(x_left: float, v_left: float, x_right: float, v_right: float, radius: float, times) -> np.ndarray:
    """x of two equal-mass balls rolling on a line, with one elastic collision: shape (T, 2).

    An elastic collision of equal masses swaps the velocities at contact (distance 2r), which is
    the same as the balls passing through each other and swapping identities:
    x_L = min(x_L0 + v_L t, x_R0 + v_R t - 2r), x_R = max(x_R0 + v_R t, x_L0 + v_L t + 2r).
    """
    t = np.asarray(times, dtype=float)
    line_l = x_left + v_left * t
    line_r = x_right + v_right * t
    return np.stack([np.minimum(line_l, line_r - 2 * radius), np.maximum(line_r, line_l + 2 * radius)], axis=-1)


def _ball_track(ball: Ball, spec: WorldSpec, times: np.ndarray) -> tuple[np.ndarray, int]:
    """(x, y) over `times` of one free ball, and its bounce count."""
    y, _, bounces = floor_bounce(ball.y0, ball.vy, ball.restitution, times,
                                 floor_y=spec.rest_y, gravity=spec.gravity, rest_speed=spec.rest_speed)
    x = ball.x0 + ball.vx * times
    return np.stack([x, y[0]], axis=-1), int(bounces[0])


def simulate(scene: Scene, spec: WorldSpec, times: np.ndarray | None = None) -> Trajectory:
    """Exact positions of the scene's balls at the frame times (or at `times`)."""
    t = spec.times() if times is None else np.asarray(times, dtype=float)
    colours = tuple(tuple(b.colour for b in scene.balls) for _ in t)
    if scene.motion == "collide":
        left, right = scene.balls
        xs = collide_tracks(left.x0, left.vx, right.x0, right.vx, spec.ball_radius, t)
        ys = np.full_like(xs, spec.rest_y)
        return Trajectory(t, np.stack([xs, ys], axis=-1), colours, (0, 0))
    tracks, bounces = zip(*(_ball_track(b, spec, t) for b in scene.balls), strict=True)
    return Trajectory(t, np.stack(tracks, axis=1), colours, tuple(bounces))


def in_frame(positions: np.ndarray, spec: WorldSpec) -> bool:
    """True if every ball lies wholly inside the frame and not below the floor."""
    r = spec.ball_radius
    x, y = positions[..., 0], positions[..., 1]
    return bool(np.all(x >= r) and np.all(x <= 1 - r) and np.all(y >= r) and np.all(y <= spec.rest_y + 1e-9))


def _fine_times(spec: WorldSpec) -> np.ndarray:
    """Times between frames too, so a ball that leaves and returns between frames is caught."""
    return np.linspace(0.0, spec.duration, 8 * (spec.frames - 1) + 1)


# ---------------------------------------------------------------------------------------------
# Scenes and captions


def scene_direction(scene: Scene) -> str:
    """`left`/`right` for a ball thrown or rolled sideways, `none` otherwise."""
    if scene.motion in ("thrown", "rolls"):
        return "left" if scene.balls[0].vx < 0 else "right"
    return "none"


def _sample_ball_scene(rng: np.random.Generator, spec: WorldSpec, motion: str, colour: str) -> Scene:
    """One candidate scene with a single ball (may leave the frame; the caller rejects it)."""
    r, top = spec.ball_radius, spec.ball_radius + 0.02
    e = float(rng.uniform(*spec.restitution))
    if motion == "falls":
        x0, y0 = float(rng.uniform(r + 0.05, 1 - r - 0.05)), float(rng.uniform(top, spec.rest_y - FALL_HEIGHT_MIN))
        return Scene(motion, (Ball(colour, x0, y0, 0.0, 0.0, e),))
    # thrown and rolling balls start where their sideways travel keeps them in the frame
    travel = float(rng.choice([-1.0, 1.0]) * rng.uniform(*TRAVEL_RANGE))
    x0 = float(rng.uniform(r + max(-travel, 0.0), 1 - r - max(travel, 0.0)))
    vx = travel / spec.duration
    if motion == "thrown":
        y0 = float(rng.uniform(top, spec.rest_y - THROW_HEIGHT_MIN))
        return Scene(motion, (Ball(colour, x0, y0, vx, float(rng.uniform(*THROW_VY_RANGE)), e),))
    return Scene(motion, (Ball(colour, x0, spec.rest_y, vx, 0.0, e),))


def _sample_collide_scene(rng: np.random.Generator, spec: WorldSpec, colours: tuple[str, str]) -> Scene:
    """Two balls rolling toward each other that meet in the middle of the clip."""
    r, d = spec.ball_radius, spec.duration
    v_left = float(rng.uniform(*COLLIDE_TRAVEL_RANGE) / d)
    v_right = -float(rng.uniform(*COLLIDE_TRAVEL_RANGE) / d)
    t_hit = float(rng.uniform(0.3, 0.65) * d)
    x_hit = float(rng.uniform(0.3, 0.7))
    left = Ball(colours[0], x_hit - r - v_left * t_hit, spec.rest_y, v_left, 0.0, 1.0)
    right = Ball(colours[1], x_hit + r - v_right * t_hit, spec.rest_y, v_right, 0.0, 1.0)
    return Scene("collide", (left, right))


def sample_scene(rng: np.random.Generator, spec: WorldSpec, motion: str | None = None,
                 colours: tuple[str, ...] | None = None) -> Scene:
    """A random scene whose balls stay wholly in the frame for the whole clip.

    There are no walls, so a scene that would carry a ball out of view is rejected and drawn
    again: in this world a ball that vanishes is never plausible.
    """
    if motion is not None and motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; use one of {MOTIONS}")
    names = list(PALETTE)
    kind = motion or str(rng.choice(MOTIONS))
    if colours is not None:
        wanted = 2 if kind == "collide" else 1
        if len(colours) != wanted or len(set(colours)) != wanted or not set(colours) <= set(PALETTE):
            raise ValueError(f"sample_scene: a {kind} scene needs {wanted} distinct palette colours "
                             f"({', '.join(PALETTE)}), got {colours}")
    for _ in range(MAX_TRIES):
        picked = colours or tuple(str(c) for c in rng.choice(names, size=2 if kind == "collide" else 1, replace=False))
        if kind == "collide":
            scene = _sample_collide_scene(rng, spec, (picked[0], picked[1]))
        else:
            scene = _sample_ball_scene(rng, spec, kind, picked[0])
        if in_frame(simulate(scene, spec, _fine_times(spec)).positions, spec):
            return scene
    raise RuntimeError(f"no {kind} scene fits in the frame after {MAX_TRIES} tries with {spec}; "
                       "use fewer frames, a higher fps or a smaller ball_radius")


def caption(scene: Scene, spec: WorldSpec | None = None) -> str:
    """The scene in the world's small caption grammar (bounces counted within the clip)."""
    colours = [b.colour for b in scene.balls]
    if scene.motion == "collide":
        return f"a {colours[0]} ball and a {colours[1]} ball roll toward each other and collide"
    direction = scene_direction(scene)
    if scene.motion == "rolls":
        return f"a {colours[0]} ball rolls to the {direction}"
    head = f"a {colours[0]} ball falls" if scene.motion == "falls" else f"a {colours[0]} ball is thrown to the {direction}"
    bounces = simulate(scene, spec or WorldSpec()).bounces[0]
    return head + (f" and bounces {_BOUNCE_WORDS.get(bounces, f'{bounces} times')}" if bounces else "")


_COLOUR = "(" + "|".join(PALETTE) + ")"
_ONE_BALL = re.compile(
    rf"^an? {_COLOUR} ball (falls|is thrown to the (left|right)|rolls to the (left|right))"
    r"(?: and bounces (once|twice|\w+ times|\d+ times))?$")
_TWO_BALLS = re.compile(rf"^an? {_COLOUR} ball and an? {_COLOUR} ball roll toward each other and collide$")
_WORD_COUNTS = {word: n for n, word in _BOUNCE_WORDS.items()}


def parse_caption(text: str) -> CaptionFacts | None:
    """Facts stated by a caption of the world's grammar, or None if it is not one.

    The bounce count is parsed when present, but caption agreement (`facts_agree`) compares
    colours, motion and direction only: a bounce that happens between two frames is not
    something a rater of an 8-frame clip can count reliably.
    """
    line = " ".join(str(text).lower().strip().rstrip(".").split())
    two = _TWO_BALLS.match(line)
    if two:
        if two.group(1) == two.group(2):
            return None
        return CaptionFacts(tuple(sorted((two.group(1), two.group(2)))), "collide", "none", 0)
    one = _ONE_BALL.match(line)
    if not one:
        return None
    colour, verb, thrown_dir, roll_dir, count = one.groups()
    motion = "falls" if verb == "falls" else "thrown" if thrown_dir else "rolls"
    if motion == "rolls" and count is not None:
        return None
    bounces: int | None = 0
    if count is not None:
        number = count.split()[0]
        bounces = _WORD_COUNTS.get(count) or (int(number) if number.isdigit() else None)
    return CaptionFacts((colour,), motion, thrown_dir or roll_dir or "none", bounces)


def scene_facts(scene: Scene, spec: WorldSpec | None = None) -> CaptionFacts:
    """The facts a correct caption of `scene` states."""
    bounces = 0 if scene.motion in ("rolls", "collide") else simulate(scene, spec or WorldSpec()).bounces[0]
    return CaptionFacts(tuple(sorted(b.colour for b in scene.balls)), scene.motion, scene_direction(scene), bounces)


def facts_agree(a: CaptionFacts | None, b: CaptionFacts | None) -> bool:
    """Same colours, motion and direction (bounce counts are deliberately ignored)."""
    if a is None or b is None:
        return False
    return a.colours == b.colours and a.motion == b.motion and a.direction == b.direction


# ---------------------------------------------------------------------------------------------
# Violations


def violate(traj: Trajectory, scene: Scene, spec: WorldSpec, violation: Violation) -> Trajectory:
    """The trajectory with `violation` applied from its onset frame on (deterministic)."""
    k, i = violation.onset, violation.ball
    pos = traj.positions.copy()
    colours = [list(c) for c in traj.colours]
    t = traj.times
    if violation.name == "teleport":
        pos[k:, i, 0] += violation.shift
    elif violation.name == "colour_change":
        for row in colours[k:]:
            row[i] = violation.colour
    elif violation.name == "stop_midair":
        pos[k:, i] = pos[k - 1, i]
    elif violation.name == "anti_gravity":
        # gravity points up from the previous frame's time on
        t0 = t[k - 1]
        state = floor_bounce(scene.balls[i].y0, scene.balls[i].vy, scene.balls[i].restitution, [t0],
                             floor_y=spec.rest_y, gravity=spec.gravity, rest_speed=spec.rest_speed)
        y0, v0 = float(state[0][0, 0]), float(state[1][0, 0])
        dt = t[k:] - t0
        pos[k:, i, 1] = y0 + v0 * dt - 0.5 * spec.gravity * dt**2
    elif violation.name == "pass_through_floor":
        # the first impact does not happen: the flight goes on below the floor
        ball = scene.balls[i]
        free = ball.y0 + ball.vy * t + 0.5 * spec.gravity * t**2
        pos[k:, i, 1] = free[k:]
    else:
        raise ValueError(f"unknown violation {violation.name!r}; use one of {VIOLATIONS}")
    return Trajectory(t, pos, tuple(tuple(c) for c in colours), traj.bounces)


def _first_impact(ball: Ball, spec: WorldSpec) -> float:
    """Time the ball first reaches the floor (inf if it rests on it from the start)."""
    if ball.y0 >= spec.rest_y and ball.vy == 0:
        return math.inf
    disc = ball.vy**2 + 2 * spec.gravity * (spec.rest_y - ball.y0)
    return (-ball.vy + math.sqrt(disc)) / spec.gravity


def _vertical_state(ball: Ball, spec: WorldSpec, time_s: float) -> tuple[float, float]:
    """(height, vertical speed) of a free ball at `time_s`."""
    y, vy, _ = floor_bounce(ball.y0, ball.vy, ball.restitution, [time_s],
                            floor_y=spec.rest_y, gravity=spec.gravity, rest_speed=spec.rest_speed)
    return float(y[0, 0]), float(vy[0, 0])


def sample_violation(rng: np.random.Generator, scene: Scene, spec: WorldSpec, name: str) -> Violation | None:
    """A clearly visible `name` violation for `scene`, or None if this scene cannot show one.

    Clearly visible means what a careful rater would call wrong at the clip's resolution, and
    nothing a bounce between two frames could pass for:
    - teleport: a sideways jump of 40-55 % of the frame;
    - colour_change: the ball turns into another palette colour;
    - stop_midair: a ball moving at >= MIN_FREEZE_SPEED, >= FREEZE_HEIGHT above the floor, hangs
      still for the rest of the clip (>= 3 more frames), a quarter of the frame off its path;
    - anti_gravity: gravity flips while the ball falls or lies on the floor; it turns around
      >= TURN_HEIGHT above the floor (or lifts off) and climbs >= MIN_DEVIATION;
    - pass_through_floor: the first impact does not happen; the ball sinks through the floor.
    Violated balls stay in view (except through the floor); onsets are after the first third.
    """
    # 1. the onset, the ball, the physical trajectory
    if scene.motion not in VIOLATION_MOTIONS[name]:
        return None
    f, k0 = spec.frames, spec.onset_min
    onset = int(rng.integers(k0, f - 1))
    ball = int(rng.integers(len(scene.balls)))
    traj = simulate(scene, spec)
    # 2. violations whose parameters are drawn, or whose onset is set by the physics
    if name == "colour_change":
        used = {b.colour for b in scene.balls}
        return Violation(name, onset, ball, colour=str(rng.choice([c for c in PALETTE if c not in used])))
    if name == "teleport":
        v = Violation(name, onset, ball, shift=float(rng.choice([-1.0, 1.0]) * rng.uniform(*TELEPORT_RANGE)))
        return v if in_frame(violate(traj, scene, spec, v).positions, spec) else None
    if name == "pass_through_floor":
        onset = int(math.floor(_first_impact(scene.balls[ball], spec) * spec.fps)) + 1
        if not k0 <= onset <= f - 2:
            return None
        v = Violation(name, onset, ball)
        depth = violate(traj, scene, spec, v).positions[-1, ball, 1] - spec.rest_y
        return v if depth >= SINK_DEPTH else None
    # 3. freezes and gravity flips: the first onset (in random order) that is clearly wrong
    last = f - 3 if name == "stop_midair" else f - 2
    for onset in rng.permutation(np.arange(k0, last + 1)):
        v = Violation(name, int(onset), ball)
        if _clearly_wrong(v, scene, traj, spec):
            return v
    return None


def _clearly_wrong(v: Violation, scene: Scene, traj: Trajectory, spec: WorldSpec) -> bool:
    """True if a freeze or gravity flip at `v.onset` is far off the physical path, keeps the ball
    in view, and is nothing a bounce could pass for (see `sample_violation`)."""
    moved = violate(traj, scene, spec, v)
    deviation = np.abs(moved.positions[:, v.ball] - traj.positions[:, v.ball]).max()
    if deviation < MIN_DEVIATION or not in_frame(moved.positions, spec):
        return False
    height, vy = _vertical_state(scene.balls[v.ball], spec, float(traj.times[v.onset - 1]))
    if v.name == "stop_midair":
        fast = math.hypot(vy, scene.balls[v.ball].vx) >= MIN_FREEZE_SPEED
        return fast and spec.rest_y - height >= FREEZE_HEIGHT
    return vy >= 0 and _climbs(moved.positions[v.onset - 1:, v.ball, 1], spec)


def _climbs(heights: np.ndarray, spec: WorldSpec) -> bool:
    """True if a track that starts when gravity flips turns around well above the floor (or
    lifts off it at once) and then rises by MIN_DEVIATION: no bounce can explain that."""
    lowest = int(np.argmax(heights))
    lifts_off = lowest == 0 and heights[0] >= spec.rest_y - 1e-9
    off_floor = spec.rest_y - heights[lowest] >= TURN_HEIGHT or lifts_off
    return bool(off_floor and heights[lowest] - heights[-1] >= MIN_DEVIATION)


# ---------------------------------------------------------------------------------------------
# Rendering


def render(traj: Trajectory, spec: WorldSpec, rng: np.random.Generator | None = None, jitter_px: float = 0.0) -> np.ndarray:
    """Draw the trajectory as RGB uint8 frames (F, size, size, 3) with anti-aliased discs.

    Each pixel near a disc is sampled `supersample` x `supersample` times and the ball's colour
    is blended in by the share it covers (area averaging), so a ball a fraction of a pixel away
    renders differently: sub-pixel motion is visible. `jitter_px` adds independent Gaussian
    offsets (std in px per axis) to every ball in every frame: the wobble of a generated video.
    """
    # 1. ball centres in px, with optional jitter
    size = spec.size
    pos = traj.positions * size
    if jitter_px > 0:
        if rng is None:
            raise ValueError("render: jitter_px > 0 needs an rng (np.random.default_rng(seed))")
        pos = pos + rng.normal(0.0, jitter_px, size=pos.shape)
    # 2. background and floor (the floor's top row blended by the share of it below floor_top)
    frames = len(traj.times)
    rows = np.clip(np.arange(size) + 1.0 - spec.floor_top * size, 0.0, 1.0)[:, None, None]
    still = (1 - rows) * np.asarray(spec.background, float) + rows * np.asarray(spec.floor_colour, float)
    canvas = np.broadcast_to(still, (frames, size, size, 3)).copy()
    # 3. balls over the floor, each blended by its coverage of the pixels around it
    for f in range(frames):
        for ball, (cx, cy) in enumerate(pos[f]):
            box, cover = disc_coverage(cx, cy, spec.ball_radius * size, size, spec.supersample)
            if cover is None:
                continue
            colour = np.asarray(PALETTE[traj.colours[f][ball]], float)
            patch = canvas[f, box[0]:box[1], box[2]:box[3]]
            patch += cover[..., None] * (colour - patch)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def disc_coverage(cx: float, cy: float, radius: float, size: int, samples: int):
    """Share of each pixel covered by a disc (centre and radius in px) on a `samples`^2 grid.

    Returns ((row0, row1, col0, col1), coverage) for the pixels around the disc that lie in the
    frame, or (None, None) when the disc is wholly outside it.
    """
    r0, r1 = max(int(math.floor(cy - radius)), 0), min(int(math.ceil(cy + radius)), size)
    c0, c1 = max(int(math.floor(cx - radius)), 0), min(int(math.ceil(cx + radius)), size)
    if r0 >= r1 or c0 >= c1:
        return None, None
    offsets = (np.arange(samples) + 0.5) / samples
    ys = (np.arange(r0, r1)[:, None] + offsets).ravel() - cy
    xs = (np.arange(c0, c1)[:, None] + offsets).ravel() - cx
    inside = (ys[:, None] ** 2 + xs[None, :] ** 2) <= radius**2
    cover = inside.reshape(r1 - r0, samples, c1 - c0, samples).mean(axis=(1, 3))
    return (r0, r1, c0, c1), cover


def degrade(frames: np.ndarray, rng: np.random.Generator, blur_sigma: float = 0.0, noise_std: float = 0.0) -> np.ndarray:
    """Gaussian blur (sigma in px) and Gaussian pixel noise (std in 0..255 units), as a
    generator's soft, grainy output looks; returns new uint8 frames."""
    out = np.asarray(frames, dtype=np.float32)
    if blur_sigma > 0:
        out = np.stack([cv2.GaussianBlur(f, (0, 0), blur_sigma, borderType=cv2.BORDER_REFLECT) for f in out])
    if noise_std > 0:
        out = out + rng.normal(0.0, noise_std, size=out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_clip(scene: Scene, spec: WorldSpec, violation: Violation | None = None,
                rng: np.random.Generator | None = None, jitter_px: float = 0.0) -> np.ndarray:
    """Frames of `scene` (with `violation` applied if given)."""
    traj = simulate(scene, spec)
    if violation is not None:
        traj = violate(traj, scene, spec, violation)
    return render(traj, spec, rng, jitter_px)


# ---------------------------------------------------------------------------------------------
# Web-video defects


def corrupt_bytes(rng: np.random.Generator) -> bytes:
    """Bytes that look like an mp4 but that no decoder can open: a valid `ftyp` box, then an
    `mdat` box of random bytes that claims more bytes than the file has and no `moov` (the
    index every mp4 needs), like a download cut short."""
    ftyp = b"ftyp" + b"isom" + (512).to_bytes(4, "big") + b"isomiso2avc1mp41"
    body = rng.bytes(int(rng.integers(512, 4096)))
    mdat = (8 + len(body) + 4096).to_bytes(4, "big") + b"mdat" + body
    return (4 + len(ftyp)).to_bytes(4, "big") + ftyp + mdat


def _other_scene(rng: np.random.Generator, spec: WorldSpec, scene: Scene, differ) -> Scene:
    """Another scene for which `differ(scene, other)` holds."""
    for _ in range(MAX_TRIES):
        other = sample_scene(rng, spec)
        if differ(scene, other):
            return other
    raise RuntimeError(f"no differing scene found after {MAX_TRIES} tries; check the palette and motions")


def apply_defect(frames: np.ndarray, scene: Scene, spec: WorldSpec, defect: str,
                 rng: np.random.Generator, *, jitter_px: float = 0.0) -> tuple[np.ndarray | None, str]:
    """(frames, caption) of `scene` with a web-video defect; frames None for `corrupt`.

    - static: the first frame repeated; too_short: the first 3 frames;
    - blur: Gaussian blur of sigma size/8 (2 px at 16 px); flicker: brightness x0.5-0.65 and
      x1.35-1.5 on alternate frames;
    - scene_cut: the second half from another scene with other colours (same `jitter_px`);
    - caption_mismatch: the caption of another scene that differs in colour, motion or direction;
    - corrupt: no frames; write `corrupt_bytes` instead of a video.
    """
    text = caption(scene, spec)
    f = len(frames)
    if defect == "static":
        return np.repeat(frames[:1], f, axis=0), text
    if defect == "too_short":
        return frames[:3].copy(), text
    if defect == "blur":
        return degrade(frames, rng, blur_sigma=spec.size / 8.0), text
    if defect == "flicker":
        gains = np.where(np.arange(f) % 2 == 0, 1.0, -1.0) * rng.uniform(0.35, 0.5, size=f) + 1.0
        out = frames.astype(np.float32) * gains[:, None, None, None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8), text
    if defect == "scene_cut":
        other = _other_scene(rng, spec, scene, lambda a, b: {x.colour for x in a.balls}.isdisjoint(x.colour for x in b.balls))
        out = frames.copy()
        out[f // 2:] = render_clip(other, spec, rng=rng, jitter_px=jitter_px)[f // 2:]
        return out, text
    if defect == "caption_mismatch":
        other = _other_scene(rng, spec, scene, lambda a, b: not facts_agree(scene_facts(a, spec), scene_facts(b, spec)))
        return frames, caption(other, spec)
    if defect == "corrupt":
        return None, text
    raise ValueError(f"unknown defect {defect!r}; use one of {DEFECTS}")


# ---------------------------------------------------------------------------------------------
# The entry point


def make_clip(rng: np.random.Generator, spec: WorldSpec, violation: str | None = None, defect: str | None = None,
              *, jitter_px: float = 0.0, blur_sigma: float = 0.0, noise_std: float = 0.0) -> Clip:
    """One clip with its caption and ground truth; deterministic for a given rng state.

    `violation` makes it physically implausible, `defect` gives it a web-video defect (both may
    be set). `jitter_px`, `blur_sigma` and `noise_std` make it look generated (the judge's
    calibration set). `truth["caption_matches"]` is False only for `caption_mismatch`: the other
    captions describe the rendered scene as it starts.
    """
    # 1. check inputs
    if violation is not None and violation not in VIOLATIONS:
        raise ValueError(f"unknown violation {violation!r}; use None or one of {VIOLATIONS}")
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; use None or one of {DEFECTS}")
    # 2. a scene (and a visible violation) that fit the frame
    applied: Violation | None = None
    for _ in range(MAX_TRIES):
        motion = None if violation is None else str(rng.choice(VIOLATION_MOTIONS[violation]))
        scene = sample_scene(rng, spec, motion)
        if violation is None:
            break
        applied = sample_violation(rng, scene, spec, violation)
        if applied is not None:
            break
    else:
        raise RuntimeError(f"could not place a visible {violation} in {MAX_TRIES} scenes with {spec}; "
                           "use more frames (>= 8) or the default ball_radius")
    # 3. render, add the defect, then look generated if asked (the look is the camera's)
    frames: np.ndarray | None = render_clip(scene, spec, applied, rng, jitter_px)
    text = caption(scene, spec)
    if defect is not None:
        frames, text = apply_defect(frames, scene, spec, defect, rng, jitter_px=jitter_px)
    if frames is not None and (blur_sigma > 0 or noise_std > 0):
        frames = degrade(frames, rng, blur_sigma, noise_std)
    # 4. ground truth as plain JSON-able values
    facts = scene_facts(scene, spec)
    truth = {
        "motion": scene.motion,
        "colours": ",".join(b.colour for b in scene.balls),
        "direction": facts.direction,
        "num_balls": len(scene.balls),
        "bounces": int(sum(simulate(scene, spec).bounces)),
        "violation": violation or "none",
        "violation_frame": applied.onset if applied else -1,
        "defect": defect or "none",
        "plausible": violation is None,
        "caption_matches": facts_agree(parse_caption(text), facts),
        "num_frames": 0 if frames is None else int(len(frames)),
        "size": spec.size,
        "fps": spec.fps,
        "jitter_px": float(jitter_px),
        "blur_sigma": float(blur_sigma),
        "noise_std": float(noise_std),
        "scene": scene.to_json(),
        "violation_params": applied.to_json() if applied else "",
    }
    return Clip(frames, text, truth, scene)
