"""Does a generated image show what its caption asks for? A GenEval-style checker (issue 10).

A tiny convolutional detector trained on the scene generator's exact ground truth
(`genlab.data.scenes`): on an 8x8 grid over the 32x32 image, each cell says whether an object's
centre lies there and, near a centre, its kind, size and exact centre, its colour, and (16x16
maps) where sunglasses and hats are. An image's caption becomes requirements (objects, colours,
sizes, accessories, the relation judged from detected centres, nothing else in the picture); the
image is correct iff all hold. `features` + `fid` give Fréchet distances in the checker's space;
`joint_fid` adds the caption (Fréchet Joint Distance), so it also sees realistic images that do
not match their captions, which the plain FID cannot.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from genlab.data import scenes as S
from genlab.errors import InvalidParameterError
from genlab.model.io import load_network, save_network

GRID = 8  # cells per side: stride 4 on a 32x32 image
PART_GRID = 16  # accessory maps: stride 2
IMAGE = 32
NK, NC = len(S.KINDS), len(S.COLOURS)
# channels per 8x8 cell: an object's centre is here?, kind, size (large?), centre offset (x, y), colour
OBJ, KIND, SIZE, OFFSET, COLOUR = 0, 1, 1 + NK, 2 + NK, 4 + NK
N_OUT = 4 + NK + NC


@dataclass
class CheckerConfig:
    width: int = 16  # channels of the first layer; deeper layers use 2x and 4x


class CheckerNet(nn.Module):
    """Three parts, each seeing only what it needs, so that what they learn recombines: six 3x3
    conv layers down to 8x8 (receptive field 29 px: a whole large cat) -> centre, kind, size,
    offset; colour from the cell's mean pixel colour alone (it cannot tie colour to shape, so "a
    red square" is read right though training never shows one); accessory maps at 16x16 from the
    third layer (receptive field 13 px), so sunglasses and a hat are seen apart and together."""

    def __init__(self, config: CheckerConfig):
        super().__init__()
        c = config.width

        def block(cin, cout, stride=1):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.early = nn.Sequential(*block(3, c), *block(c, 2 * c, 2), *block(2 * c, 2 * c))
        self.late = nn.Sequential(*block(2 * c, 4 * c, 2), *block(4 * c, 4 * c), *block(4 * c, 4 * c))
        self.head = nn.Sequential(nn.Conv2d(4 * c, 4 * c, 1), nn.ReLU(inplace=True), nn.Conv2d(4 * c, N_OUT - NC, 1))
        self.colour = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(inplace=True), nn.Conv2d(32, NC, 1))
        self.parts = nn.Sequential(*block(2 * c, 2 * c), nn.Conv2d(2 * c, len(S.ACCESSORIES), 1))
        with torch.no_grad():  # start the rare "yes" maps near their base rate (as RetinaNet does), not at 0.5
            self.head[-1].bias[OBJ] = -4.0
            self.parts[-1].bias.fill_(-4.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> cells [B, N_OUT, 8, 8], accessory logits [B, 2, 16, 16], features [B, 4w, 8, 8]"""
        early = self.early(x)
        feats = self.late(early)
        cells = torch.cat([self.head(feats), self.colour(F.avg_pool2d(x, IMAGE // GRID))], 1)
        return cells, self.parts(early), feats


@dataclass
class Detection:
    kind: str
    colour: str | None
    size: str
    x: float  # centre, fractions of the image side
    y: float
    sunglasses: bool
    hat: bool
    score: float  # object probability mass around the centre (~1 for a clear object)

    key = property(lambda self: (self.kind, self.colour))


# ---------------------------------------------------------------- targets and loss

def _targets(specs: list[S.Scene], colour_known: list[bool]) -> dict[str, torch.Tensor]:
    """Dense targets. "An object's centre is here" and its colour at the centre cell; kind, size
    and offset at the centre cell and its 8 neighbours, so decoding may read them off any cell
    near a peak (objects' centres are always > 2 cells apart). Accessories: 1 on the 16x16
    cells inside where each is drawn."""
    n = len(specs)
    centre = torch.zeros(n, GRID, GRID)
    kind = torch.full((n, GRID, GRID), -100, dtype=torch.long)
    colour = torch.full((n, GRID, GRID), -100, dtype=torch.long)
    attr = torch.zeros(n, 3, GRID, GRID)  # large, dx, dy
    near = torch.zeros(n, GRID, GRID)
    parts = torch.zeros(n, len(S.ACCESSORIES), PART_GRID, PART_GRID)
    cell_x, cell_centres = torch.arange(GRID) + 0.5, (np.arange(PART_GRID) + 0.5) / PART_GRID
    for i, spec in enumerate(specs):
        for o in spec.objects:
            gx, gy = o.x * GRID, o.y * GRID
            cj, ci = min(int(gx), GRID - 1), min(int(gy), GRID - 1)
            centre[i, ci, cj] = 1
            if o.colour is not None and colour_known[i]:
                colour[i, ci, cj] = S.COLOURS.index(o.colour)
            rows, cols = slice(max(ci - 1, 0), ci + 2), slice(max(cj - 1, 0), cj + 2)  # the 3x3 around it
            kind[i, rows, cols] = S.KINDS.index(o.kind)
            near[i, rows, cols] = 1
            attr[i, 0, rows, cols] = float(o.size == "large")
            attr[i, 1, rows, cols] = gx - cell_x[cols]  # offsets from each cell's own centre
            attr[i, 2, rows, cols] = (gy - cell_x[rows])[:, None]
            for a, part in enumerate(S.ACCESSORIES):
                if getattr(o, part):
                    e, (x0, y0, x1, y1) = S.extent(o), S.PART_BOXES[part]
                    cols = (cell_centres >= o.x + x0 * e) & (cell_centres <= o.x + x1 * e)
                    rows = (cell_centres >= o.y + y0 * e) & (cell_centres <= o.y + y1 * e)
                    parts[i, a] = torch.maximum(parts[i, a], torch.from_numpy(rows[:, None] & cols[None, :]).float())
    return {"centre": centre, "kind": kind, "colour": colour, "attr": attr, "near": near, "parts": parts}


def _loss(cells: torch.Tensor, parts: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """Centre-ness and accessory maps over all cells (summed per image); the rest only near
    objects, each at full weight, so the rare object cells are not drowned by the empty ones."""
    near, n = t["near"], len(cells)
    n_near = near.sum().clamp(min=1)
    loss = F.binary_cross_entropy_with_logits(cells[:, OBJ], t["centre"], reduction="sum") / n
    loss = loss + F.binary_cross_entropy_with_logits(parts, t["parts"], reduction="sum") / n
    loss = loss + F.cross_entropy(cells[:, KIND:SIZE], t["kind"], ignore_index=-100)
    if (t["colour"] >= 0).any():
        loss = loss + F.cross_entropy(cells[:, COLOUR:], t["colour"], ignore_index=-100)
    loss = loss + (F.binary_cross_entropy_with_logits(cells[:, SIZE], t["attr"][:, 0], reduction="none") * near).sum() / n_near
    return loss + (F.smooth_l1_loss(cells[:, OFFSET:COLOUR], t["attr"][:, 1:], reduction="none").sum(1) * near).sum() / n_near


def _occlude(image: np.ndarray, spec: S.Scene, rng: np.random.Generator) -> np.ndarray:
    """Paste one or two near-black rectangles (2-12 px) that cover no object's centre. The
    checker learns that dark patches on or beside an object change neither its kind nor its
    presence, which is what lets it find a cat wearing sunglasses AND a hat, never seen in training."""
    image = image.copy()
    side = image.shape[0]
    for _ in range(int(rng.integers(1, 3))):
        w, h = rng.integers(2, 13, size=2)
        x0, y0 = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
        if any(x0 - 1 <= o.x * side <= x0 + w + 1 and y0 - 1 <= o.y * side <= y0 + h + 1 for o in spec.objects):
            continue
        image[y0:y0 + h, x0:x0 + w] = rng.integers(0, 45, size=3)
    return image


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild damage of the kind a generator's decoder leaves (noise, blur, tint), so the checker
    judges content, not the renderer's exact pixels."""
    n = x.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=gen) < 0.25
    x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1), x)
    x = x * (1 + 0.1 * (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)) + 0.06 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    return x + torch.randn(x.shape, generator=gen) * 0.05 * torch.rand(n, 1, 1, 1, generator=gen)


def _to_input(images) -> torch.Tensor:
    """uint8 [N, H, W, 3] (any square size; resized to 32) -> float [N, 3, 32, 32] around 0."""
    images = np.asarray(images)
    images = images[None] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidParameterError(f"images must be [N, H, W, 3]; got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0 - 0.5
    if x.shape[-1] != IMAGE or x.shape[-2] != IMAGE:
        x = F.interpolate(x, size=(IMAGE, IMAGE), mode="area" if x.shape[-1] > IMAGE else "bilinear")
    return x


# ---------------------------------------------------------------- the checker

class SceneChecker:
    def __init__(self, net: CheckerNet, config: CheckerConfig, meta: dict | None = None):
        self.net, self.config, self.meta = net.eval(), config, meta or {}

    @classmethod
    def train(cls, steps: int = 800, seed: int = 0, batch_size: int = 64, lr: float = 3e-3, split: str = "train",
              recolour: float = 0.5, occlude: float = 0.3, config: CheckerConfig | None = None,
              progress: bool = False) -> "SceneChecker":
        """Train on freshly rendered scenes of `split` (default "train": the held-out combinations
        are never seen, as for the generator being judged); a `recolour` fraction of them has its
        shapes in random colours, which teaches shape apart from colour, and an `occlude` fraction
        dark patches (see `_occlude`). Same seed, same checker."""
        if steps < 1 or batch_size < 1:
            raise InvalidParameterError("steps and batch_size must be >= 1")
        config = config or CheckerConfig()
        torch.manual_seed(seed)
        rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        net = CheckerNet(config).train()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        t0, losses = time.perf_counter(), []
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), disable=not progress)
        with bar:
            task = bar.add_task("scene checker", total=steps, loss=float("nan"))
            for _ in range(steps):
                specs = [S.sample_scene(rng, split) for _ in range(batch_size)]
                known = (rng.random(batch_size) >= recolour).tolist()  # the others: shapes in random colours
                images = [S.render(s, IMAGE, None if k else S.random_palette(rng)) for s, k in zip(specs, known)]
                images = [_occlude(im, s, rng) if rng.random() < occlude else im for im, s in zip(images, specs)]
                cells, parts, _ = net(_augment(_to_input(np.stack(images)), gen))
                loss = _loss(cells, parts, _targets(specs, known))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(task, advance=1, loss=float(np.mean(losses[-50:])))
        meta = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "split": split, "recolour": recolour,
                "occlude": occlude, "final_loss": float(np.mean(losses[-50:])), "seconds": round(time.perf_counter() - t0, 1)}
        return cls(net, config, meta)

    # ------------------------------------------------------------ persistence

    def save(self, out_dir) -> Path:
        """`checker.safetensors` + `checker.json` in `out_dir`, written as a whole (temp, rename)."""
        info = {"config": asdict(self.config), "meta": self.meta, "kinds": S.KINDS, "colours": S.COLOURS}
        return save_network(out_dir, "checker", self.net, info)

    @classmethod
    def load(cls, path) -> "SceneChecker":
        def build(info):
            if tuple(info["kinds"]) != S.KINDS or tuple(info["colours"]) != S.COLOURS:
                raise ValueError("trained on other kinds or colours")
            return CheckerNet(CheckerConfig(**info["config"]))

        net, info = load_network(path, "checker", build, "scene checker")
        return cls(net, CheckerConfig(**info["config"]), info.get("meta"))

    # ------------------------------------------------------------ reading images

    @torch.no_grad()
    def _run(self, images, batch_size: int = 256):
        x = _to_input(images)
        for start in range(0, len(x), batch_size):
            yield self.net(x[start:start + batch_size])

    def detect(self, images) -> list[list[Detection]]:
        """Objects found in each image: peaks of the object probability (3x3 local maxima whose
        neighbourhood holds > 0.5 of it); attributes averaged over the peak's neighbourhood."""
        return [_decode(c, p) for cells, parts, _ in self._run(images) for c, p in zip(cells, torch.sigmoid(parts))]

    def accessory_evidence(self, images, accessory: str = "sunglasses") -> np.ndarray:
        """Per image, the checker's strongest evidence (0..1) that `accessory` is drawn anywhere:
        the maximum of its accessory map [N], whether or not a cat is found under it (`detect`
        decides that). Graded: of two images without the accessory, the one whose map comes closer
        to firing scores higher."""
        if accessory not in S.ACCESSORIES:
            raise InvalidParameterError(f"accessory must be one of {', '.join(S.ACCESSORIES)}; got {accessory!r}")
        a = S.ACCESSORIES.index(accessory)
        maps = [torch.sigmoid(parts[:, a]).amax((1, 2)).double().numpy() for _, parts, _ in self._run(images)]
        return np.concatenate(maps) if maps else np.zeros(0)

    def features(self, images) -> np.ndarray:
        """Mean- and max-pooled last feature map [N, 8 * width] (the space for `fid`)."""
        parts = [torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1).double().numpy() for _, _, f in self._run(images)]
        return np.concatenate(parts) if parts else np.zeros((0, 8 * self.config.width))

    def check(self, image, caption_or_spec) -> dict[str, bool]:
        """Requirement -> met, for one image [H, W, 3] and its caption (str) or Scene."""
        spec = S.parse_caption(caption_or_spec) if isinstance(caption_or_spec, str) else caption_or_spec
        return requirements(spec, self.detect(np.asarray(image)[None])[0])

    def check_all(self, images, specs) -> list[dict[str, bool]]:
        specs = [S.parse_caption(s) if isinstance(s, str) else s for s in specs]
        if len(specs) != len(images):
            raise InvalidParameterError(f"{len(images)} images but {len(specs)} captions/specs")
        return [requirements(s, d) for s, d in zip(specs, self.detect(images))]

    def compositional_accuracy(self, images, specs) -> float:
        """Fraction of images whose every requirement holds (GenEval's per-image score)."""
        results = self.check_all(images, specs)
        return float(np.mean([all(r.values()) for r in results])) if results else float("nan")

    def requirement_accuracy(self, images, specs) -> dict[str, float]:
        """Accuracy per kind of requirement (object, colour, size, accessory, relation, count)."""
        tally: dict[str, list[bool]] = {}
        for r in self.check_all(images, specs):
            for name, ok in r.items():
                tally.setdefault(name.split(":")[0], []).append(ok)
        return {k: float(np.mean(v)) for k, v in sorted(tally.items())}


def _decode(cells: torch.Tensor, parts: torch.Tensor) -> list[Detection]:
    p_obj = torch.sigmoid(cells[OBJ])
    window = lambda t: F.avg_pool2d(t[None], 3, 1, 1, count_include_pad=True)[0] * 9  # noqa: E731  3x3 sums
    mass = window(p_obj[None])[0]
    peaks = (p_obj == F.max_pool2d(p_obj[None, None], 3, 1, 1)[0, 0]) & (mass > 0.5)
    grid = torch.arange(GRID, dtype=cells.dtype) + 0.5
    centre_x = (grid[None, :] + cells[OFFSET]) / GRID  # each cell's offset is from its own centre
    centre_y = (grid[:, None] + cells[OFFSET + 1]) / GRID
    per_cell = torch.cat([cells[KIND:SIZE].softmax(0), torch.sigmoid(cells[SIZE:OFFSET]), centre_x[None], centre_y[None]])
    weighted = window(per_cell * p_obj) / mass.clamp(min=1e-6)  # p_obj-weighted means over 3x3
    colours = cells[COLOUR:].argmax(0)
    dets, taken = [], []
    for i, j in sorted(peaks.nonzero().tolist(), key=lambda ij: -mass[ij[0], ij[1]].item()):
        if any(abs(i - a) <= 1 and abs(j - b) <= 1 for a, b in taken):
            continue  # a tie between neighbouring cells: one object, not two
        taken.append((i, j))
        w = weighted[:, i, j].tolist()
        kind = S.KINDS[int(np.argmax(w[:NK]))]
        colour = S.COLOURS[int(colours[i, j])] if kind in S.SHAPES else None
        size, x, y = ("large" if w[NK] > 0.5 else "small"), w[NK + 1], w[NK + 2]
        worn = _accessories(parts, x, y, size) if kind == "cat" else (False, False)
        dets.append(Detection(kind, colour, size, x, y, *worn, score=float(mass[i, j])))
    return dets


def _accessories(parts: torch.Tensor, x: float, y: float, size: str) -> tuple[bool, ...]:
    """Each accessory map's maximum over where that accessory would be drawn on this cat (a
    little margin around the box)."""
    e, found = S.SIZE_FRACTION[size], []
    for a, part in enumerate(S.ACCESSORIES):
        x0, y0, x1, y1 = S.PART_BOXES[part]
        r0, r1 = (y + (y0 - 0.1) * e) * PART_GRID, (y + (y1 + 0.1) * e) * PART_GRID
        c0, c1 = (x + (x0 - 0.1) * e) * PART_GRID, (x + (x1 + 0.1) * e) * PART_GRID
        region = parts[a, max(int(r0), 0):max(int(np.ceil(r1)), 1), max(int(c0), 0):max(int(np.ceil(c1)), 1)]
        found.append(bool(region.numel() and region.max() > 0.5))
    return tuple(found)


def _holds(relation: str, a: Detection, b: Detection) -> bool:
    """A relation between two centres: the displacement must lie mostly along its axis."""
    dx, dy = b.x - a.x, b.y - a.y
    return {"left of": dx > abs(dy), "right of": -dx > abs(dy), "above": dy > abs(dx), "below": -dy > abs(dx),
            "next to": abs(dx) > abs(dy)}[relation]


def requirements(spec: S.Scene, dets: list[Detection]) -> dict[str, bool]:
    """What the caption of `spec` asks for, each judged against the detections."""
    out: dict[str, bool] = {}
    best = {d.key: d for d in sorted(dets, key=lambda d: d.score)}  # the most confident of each (kind, colour)
    for kind in dict.fromkeys(o.kind for o in spec.objects):
        want = sum(o.kind == kind for o in spec.objects)
        out[f"object: {kind}"] = sum(d.kind == kind for d in dets) >= want
    for o in spec.objects:
        name = f"{o.colour} {o.kind}" if o.colour else o.kind
        d = best.get(o.key)
        if o.colour:
            out[f"colour: {name}"] = d is not None
        if spec.say_size:
            out[f"size: {o.size} {name}"] = d is not None and d.size == o.size
        if o.kind == "cat":
            for acc in S.ACCESSORIES:
                out[f"accessory: cat {'with' if getattr(o, acc) else 'without'} {acc}"] = (
                    d is not None and getattr(d, acc) == getattr(o, acc))
    if spec.relation:
        a, b = spec.objects
        da, db = best.get(a.key), best.get(b.key)
        name = f"relation: {S.noun_phrase(a)} {spec.relation} {S.noun_phrase(b)}"
        out[name] = da is not None and db is not None and _holds(spec.relation, da, db)
    n = len(spec.objects)
    out[f"count: exactly {n} object{'s' if n > 1 else ''}"] = len(dets) == n
    return out


# ---------------------------------------------------------------- Fréchet distances

def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D]."""
    from scipy import linalg

    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise InvalidParameterError(f"fid needs two [N>=2, D] feature sets; got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # dead ReLU channels make the covariances singular; a tiny ridge (as pytorch-fid falls back
    # to) keeps sqrtm well posed and moves the distance by ~1e-6 per dimension
    eps = 1e-6 * max(np.trace(cov_a) / len(cov_a), 1e-12) * np.eye(len(cov_a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean.real))
    return max(d, 0.0)


def condition_vectors(specs) -> np.ndarray:
    """Captions (or Scenes) as vectors [N, 66] for `joint_fid` (see `scenes.condition_vector`)."""
    specs = [S.parse_caption(s) if isinstance(s, str) else s for s in specs]
    return np.stack([S.condition_vector(s) for s in specs]) if specs else np.zeros((0, 66))


def joint_fid(feats_a, conds_a, feats_b, conds_b) -> float:
    """Fréchet Joint Distance (DeVries et al. 2019): FID on [image features, alpha * caption vector],
    alpha matching the two parts' mean norms on set a, so an image that fits no caption counts."""
    feats_a, feats_b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    conds_a, conds_b = np.asarray(conds_a, np.float64), np.asarray(conds_b, np.float64)
    alpha = np.linalg.norm(feats_a, axis=1).mean() / max(np.linalg.norm(conds_a, axis=1).mean(), 1e-12)
    return fid(np.hstack([feats_a, alpha * conds_a]), np.hstack([feats_b, alpha * conds_b]))

